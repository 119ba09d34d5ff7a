"""The SecAgg+ server (semi-honest) as an explicit state machine.

Stages: ``ADVERTISE → SHARE_KEYS → MASKED_INPUT → UNMASK → DONE`` (or ``ABORTED``). In each
stage the transport feeds client messages to :meth:`SecAggServer.receive`, then calls
:meth:`SecAggServer.advance`, which closes the stage (clients not heard from have dropped)
and returns the bytes to send to each remaining client. A rejected message raises a
:class:`~protocols.secagg.errors.SecAggError` subclass and changes nothing.

Dropout handling: after masked input, the server checks that every survivor's self-mask seed
and every dropped client's mask key can be reconstructed from ≥ threshold neighbours still
online; otherwise it aborts *before* asking for any share, so nothing is revealed.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from protocols.keys import (
    AgreementKey,
    InvalidKeyError,
    SignatureError,
    check_agreement_public_key,
    ring_keystream,
    verify_signature,
)
from protocols.secagg import masks
from protocols.secagg.client import check_header
from protocols.secagg.config import RoundConfig
from protocols.secagg.errors import (
    BadSignatureError,
    MalformedMessageError,
    ProtocolViolationError,
    ReplayedMessageError,
    SecAggAbortError,
    StageError,
)
from protocols.secagg.graph import neighbour_graph
from protocols.secagg.messages import (
    SERVER,
    Advertise,
    Delivery,
    Header,
    MaskedInput,
    MsgType,
    Roster,
    RosterEntry,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
    add_mac,
    strip_mac,
)
from protocols.secagg.shamir import ShamirError, decode_share, reconstruct_secret

__all__ = ["SecAggServer", "ServerStage"]


class ServerStage(Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class SecAggServer:
    """The aggregator's side of one SecAgg+ round; :attr:`result` is the int64 ring sum of
    the survivors' encoded inputs, :meth:`decoded` the decoded sum."""

    def __init__(
        self, config: RoundConfig, identity_registry: Sequence[bytes], server_key: AgreementKey
    ) -> None:
        if len(identity_registry) != config.n:
            raise ValueError("identity registry must have one key per roster client")
        if server_key.public_bytes() != config.server_pk:
            raise ValueError("server key does not match the round's server_pk")
        self._key = server_key
        self._macs: dict[int, bytes] = {}
        self.config = config
        self._ctx = masks.Contexts(config)
        self._registry = tuple(identity_registry)
        self.graph = neighbour_graph(config.graph_seed, config.n, config.degree)
        self._nbrs = [frozenset(g) for g in self.graph]
        self.stage = ServerStage.ADVERTISE
        self._adverts: dict[int, Advertise] = {}
        self.u1: frozenset[int] = frozenset()
        self._bundles: dict[int, ShareBundle] = {}
        self.u2: frozenset[int] = frozenset()
        self._masked: dict[int, torch.Tensor] = {}
        self.u3: frozenset[int] = frozenset()
        self.dropped: frozenset[int] = frozenset()
        self._requests: dict[int, UnmaskRequest] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self.result: torch.Tensor | None = None

    # -- public ----------------------------------------------------------------------
    def receive(self, sender: int, blob: bytes) -> None:
        """Accept one client message for the current stage (``sender`` = transport-level
        roster index of the client it came from)."""
        if not isinstance(sender, int) or not 0 <= sender < self.config.n:
            raise MalformedMessageError(f"unknown sender {sender!r}")
        handler = {
            ServerStage.ADVERTISE: self._on_advertise,
            ServerStage.SHARE_KEYS: self._on_shares,
            ServerStage.MASKED_INPUT: self._on_masked,
            ServerStage.UNMASK: self._on_unmask,
        }.get(self.stage)
        if handler is None:
            raise StageError(f"server is {self.stage.value}; no messages accepted")
        handler(sender, blob)

    def advance(self) -> dict[int, bytes]:
        """Close the current stage; return ``{client index: bytes}`` for the next one (empty
        after unmasking, when :attr:`result` is set). Raises :class:`SecAggAbortError` (and
        moves to ``ABORTED``) if too many clients dropped."""
        step = {
            ServerStage.ADVERTISE: self._close_advertise,
            ServerStage.SHARE_KEYS: self._close_shares,
            ServerStage.MASKED_INPUT: self._close_masked,
            ServerStage.UNMASK: self._close_unmask,
        }.get(self.stage)
        if step is None:
            raise StageError(f"server is {self.stage.value}; nothing to advance")
        try:
            return step()
        except SecAggAbortError:
            self.stage = ServerStage.ABORTED
            self._masked.clear()
            self._responses.clear()
            raise

    def decoded(self) -> torch.Tensor:
        """The decoded sum of the survivors' inputs."""
        if self.result is None:
            raise StageError("no result: the round has not completed")
        return self.config.spec.decode(self.result)

    # -- helpers ---------------------------------------------------------------------
    def _check(self, sender: int, header: Header, store: dict[int, object],
               allowed: frozenset[int] | None) -> None:
        check_header(self.config, header, sender, SERVER)
        if sender in store:
            raise ReplayedMessageError(f"second {header.type.name} message from {sender}")
        if allowed is not None and sender not in allowed:
            raise ProtocolViolationError(f"client {sender} is not part of this stage")

    def _out_header(self, mtype: MsgType, receiver: int) -> Header:
        return Header(mtype, self.config.run_id, self.config.round, SERVER, receiver)

    def _body(self, sender: int, blob: bytes) -> bytes:
        if sender not in self._macs:
            raise ProtocolViolationError(f"client {sender} has not advertised keys")
        limit = 400 + max(136 * self.config.degree, 8 * self.config.spec.length)
        return strip_mac(self._macs[sender], blob, limit)

    def _prune(self, alive: set[int]) -> frozenset[int]:
        """Largest subset in which every client keeps ≥ threshold live neighbours."""
        t = self.config.threshold
        changed = True
        while changed:
            changed = False
            for i in list(alive):
                if len(self._nbrs[i] & alive) < t:
                    alive.discard(i)
                    changed = True
        return frozenset(alive)

    def _require(self, alive: frozenset[int], what: str) -> None:
        if len(alive) < self.config.min_survivors:
            raise SecAggAbortError(
                f"{len(alive)} clients left after {what}, minimum is {self.config.min_survivors}"
            )

    # -- stage 0 ---------------------------------------------------------------------
    def _on_advertise(self, sender: int, blob: bytes) -> None:
        msg = Advertise.decode(blob, self.config.n)
        self._check(sender, msg.header, self._adverts, None)  # type: ignore[arg-type]
        stmt = masks.signed_key_statement(self._ctx, sender, msg.c_pk, msg.s_pk)
        try:
            verify_signature(self._registry[sender], msg.signature, stmt)
        except (SignatureError, InvalidKeyError) as exc:
            raise BadSignatureError(f"key advertisement of {sender} does not verify") from exc
        try:
            check_agreement_public_key(msg.s_pk)
            mac = masks.server_mac_key(self._ctx, self._key, sender, msg.c_pk)
        except InvalidKeyError as exc:
            raise ProtocolViolationError(
                f"client {sender} advertised an invalid (low-order) key"
            ) from exc
        self._adverts[sender] = msg
        self._macs[sender] = mac

    def _close_advertise(self) -> dict[int, bytes]:
        u1 = self._prune(set(self._adverts))
        self._require(u1, "advertise keys")
        out = {}
        for i in sorted(u1):
            entries = tuple(
                RosterEntry(j, a.c_pk, a.s_pk, a.signature)
                for j in sorted(self._nbrs[i] & u1)
                for a in (self._adverts[j],)
            )
            out[i] = add_mac(
                self._macs[i], Roster(self._out_header(MsgType.ROSTER, i), entries).encode()
            )
        self.u1 = u1
        self.stage = ServerStage.SHARE_KEYS
        return out

    # -- stage 1 ---------------------------------------------------------------------
    def _on_shares(self, sender: int, blob: bytes) -> None:
        msg = ShareBundle.decode(self._body(sender, blob), self.config.n, self.config.degree)
        self._check(sender, msg.header, self._bundles, self.u1)  # type: ignore[arg-type]
        receivers = {j for j, _ in msg.envelopes}
        if receivers != self._nbrs[sender] & self.u1:
            raise ProtocolViolationError(f"client {sender} did not share with exactly its live "
                                         "neighbours")
        self._bundles[sender] = msg

    def _close_shares(self) -> dict[int, bytes]:
        u2 = self._prune(set(self._bundles))
        self._require(u2, "share keys")
        inbox: dict[int, list[tuple[int, bytes]]] = {i: [] for i in u2}
        for i in sorted(u2):
            for j, env in self._bundles[i].envelopes:
                if j in u2:
                    inbox[j].append((i, env))
        out = {
            j: add_mac(
                self._macs[j], Delivery(self._out_header(MsgType.DELIVERY, j), tuple(envs)).encode()
            )
            for j, envs in inbox.items()
        }
        self.u2 = u2
        self._bundles.clear()
        self.stage = ServerStage.MASKED_INPUT
        return out

    # -- stage 2 ---------------------------------------------------------------------
    def _on_masked(self, sender: int, blob: bytes) -> None:
        msg = MaskedInput.decode(self._body(sender, blob), self.config.n, self.config.spec.length)
        self._check(sender, msg.header, self._masked, self.u2)  # type: ignore[arg-type]
        self._masked[sender] = msg.vector

    def _close_masked(self) -> dict[int, bytes]:
        cfg = self.config
        u3 = frozenset(self._masked)
        self._require(u3, "masked input")
        dropped = self.u2 - u3
        # Every secret we will need must have >= t holders among the survivors. Check
        # before asking for any share: an abort then reveals nothing.
        for i in sorted(self.u2):
            holders = len(self._nbrs[i] & self.u2 & u3)
            if holders < cfg.threshold:
                kind = "self-mask seed" if i in u3 else "mask key"
                raise SecAggAbortError(
                    f"{kind} of client {i} has {holders} live holders, threshold "
                    f"{cfg.threshold}: aborting before unmasking"
                )
        out = {}
        for i in sorted(u3):
            nb = self._nbrs[i] & self.u2
            req = UnmaskRequest(
                self._out_header(MsgType.UNMASK_REQUEST, i),
                len(u3),
                tuple(sorted((nb & u3) | {i})),
                tuple(sorted(nb & dropped)),
            )
            self._requests[i] = req
            out[i] = add_mac(self._macs[i], req.encode())
        self.u3, self.dropped = u3, dropped
        self.stage = ServerStage.UNMASK
        return out

    # -- stage 3 ---------------------------------------------------------------------
    def _on_unmask(self, sender: int, blob: bytes) -> None:
        msg = UnmaskResponse.decode(self._body(sender, blob), self.config.n, self.config.degree)
        self._check(sender, msg.header, self._responses, self.u3)  # type: ignore[arg-type]
        req = self._requests[sender]
        expected = {j: ShareKind.SELF_MASK for j in req.survivors if j != sender}
        expected.update({j: ShareKind.MASK_KEY for j in req.dropped})
        got = {j: kind for j, kind, _ in msg.shares}
        if got != expected:
            raise ProtocolViolationError(f"unmask response of {sender} does not match its request")
        try:
            for _, _, share in msg.shares:
                decode_share(share)
        except ShamirError as exc:
            raise MalformedMessageError(f"invalid share from {sender}: {exc}") from exc
        self._responses[sender] = msg

    def _close_unmask(self) -> dict[int, bytes]:
        cfg = self.config
        shares: dict[int, dict[int, bytes]] = {i: {} for i in self.u2}
        for holder, msg in self._responses.items():
            for j, _, share in msg.shares:
                shares[j][holder + 1] = share
        for i, got in shares.items():
            if len(got) < cfg.threshold:
                raise SecAggAbortError(
                    f"only {len(got)} shares for client {i}, threshold {cfg.threshold}"
                )
        total = torch.zeros(cfg.spec.length, dtype=torch.int64)
        for i in sorted(self.u3):
            total.add_(self._masked[i])
        buf = torch.empty(cfg.spec.length, dtype=torch.int64)
        try:
            for i in sorted(self.u3):
                seed = reconstruct_secret(shares[i], cfg.threshold)
                ring_keystream(masks.self_mask_key(self._ctx, i, seed), buf.numel(), out=buf)
                total.sub_(buf)
            for d in sorted(self.dropped):
                sk = AgreementKey.from_private_bytes(reconstruct_secret(shares[d], cfg.threshold))
                if sk.public_bytes() != self._adverts[d].s_pk:
                    raise ProtocolViolationError(f"reconstructed mask key of {d} is inconsistent")
                for i in sorted(self._nbrs[d] & self.u3):
                    key = masks.pairwise_mask_key(self._ctx, sk, d, i, self._adverts[i].s_pk)
                    masks.add_pairwise_mask(total, key, i, d, buf, sign=-1)
        except (ShamirError, InvalidKeyError) as exc:
            raise ProtocolViolationError(f"share reconstruction failed: {exc}") from exc
        self.result = total
        self._masked.clear()
        self._responses.clear()
        self.stage = ServerStage.DONE
        return {}
