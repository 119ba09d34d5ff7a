"""The SecAgg+ client as an explicit state machine.

Stages: ``ADVERTISE → SHARE_KEYS → MASKED_INPUT → UNMASK → DONE``. Each method takes the
server's bytes for the current stage and returns the client's reply bytes. A rejected
message raises a :class:`~protocols.secagg.errors.SecAggError` subclass and leaves the state
unchanged: everything is validated before anything is stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from enum import Enum

import numpy as np
import torch

from protocols.envelope import EnvelopeError, ReplayGuard, open_envelope, seal
from protocols.keys import (
    AgreementKey,
    IdentityKey,
    InvalidKeyError,
    SignatureError,
    ring_keystream,
    verify_signature,
)
from protocols.secagg import masks
from protocols.secagg.config import RoundConfig
from protocols.secagg.errors import (
    BadSignatureError,
    MalformedMessageError,
    MisroutedMessageError,
    ProtocolViolationError,
    SecAggAbortError,
    StageError,
    StaleMessageError,
    TamperedShareError,
)
from protocols.secagg.graph import neighbours_of
from protocols.secagg.messages import (
    SERVER,
    Advertise,
    Delivery,
    Header,
    MaskedInput,
    MsgType,
    Roster,
    ShareBundle,
    ShareKind,
    SharePayload,
    Step,
    UnmaskRequest,
    UnmaskResponse,
    add_mac,
    strip_mac,
)
from protocols.secagg.shamir import ShamirError, decode_share, share_secret

__all__ = ["ClientStage", "SecAggClient", "check_header"]


class ClientStage(Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


def check_header(cfg: RoundConfig, header: Header, sender: int, receiver: int) -> None:
    """Reject a header from another run/round, or with the wrong sender/receiver."""
    if header.run_id != cfg.run_id or header.round != cfg.round:
        raise StaleMessageError(
            f"message for run {header.run_id!r} round {header.round}, expected "
            f"{cfg.run_id!r} round {cfg.round}"
        )
    if header.receiver != receiver:
        raise MisroutedMessageError(f"message for {header.receiver}, delivered to {receiver}")
    if header.sender != sender:
        raise MisroutedMessageError(f"message claims sender {header.sender}, came from {sender}")


class SecAggClient:
    """One client's side of a SecAgg+ round.

    ``identity_registry[j]`` is the Ed25519 public key of roster client ``j`` (a PKI the
    clients trust, e.g. from enrolment): neighbours' key advertisements must verify under it.
    """

    def __init__(
        self,
        config: RoundConfig,
        index: int,
        identity: IdentityKey,
        identity_registry: Sequence[bytes],
    ) -> None:
        if not 0 <= index < config.n:
            raise ValueError(f"index {index} outside the roster of {config.n}")
        if len(identity_registry) != config.n:
            raise ValueError("identity registry must have one key per roster client")
        if identity.public_bytes() != identity_registry[index]:
            raise ValueError("identity key does not match the registry entry")
        self.config = config
        self._ctx = masks.Contexts(config)
        self.index = index
        self._identity = identity
        self._registry = tuple(identity_registry)
        self.neighbours = frozenset(
            neighbours_of(config.graph_seed, config.n, config.degree, index)
        )
        self.stage = ClientStage.ADVERTISE
        self._guard = ReplayGuard()
        self._c_key: AgreementKey | None = None
        self._s_key: AgreementKey | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}  # U1 neighbours: (c_pk, s_pk)
        self._channel: dict[int, bytes] = {}  # U1 neighbours: share-channel keys
        self._b_seed: bytes | None = None
        self._mac: bytes = b""  # HMAC key shared with the server
        self._held: dict[int, tuple[bytes, bytes]] = {}  # U2 neighbours: their shares for me

    # -- helpers ---------------------------------------------------------------------
    def _expect(self, stage: ClientStage) -> None:
        if self.stage is not stage:
            raise StageError(f"client {self.index} is in stage {self.stage.value}, "
                             f"not {stage.value}")

    @property
    def _limit(self) -> int:
        return 400 + 136 * (self.config.degree + 2)

    def _body(self, blob: bytes) -> bytes:
        return strip_mac(self._mac, blob, self._limit)

    def _header(self, mtype: MsgType) -> Header:
        return Header(mtype, self.config.run_id, self.config.round, self.index, SERVER)

    # -- stage 0 ---------------------------------------------------------------------
    def advertise_keys(self) -> bytes:
        """Generate this round's channel and mask keys and return the signed advertisement."""
        self._expect(ClientStage.ADVERTISE)
        c_key, s_key = AgreementKey.generate(), AgreementKey.generate()
        c_pk, s_pk = c_key.public_bytes(), s_key.public_bytes()
        sig = self._identity.sign(masks.signed_key_statement(self._ctx, self.index, c_pk, s_pk))
        try:
            mac = masks.server_mac_key(self._ctx, c_key, self.index, self.config.server_pk)
        except InvalidKeyError as exc:
            raise ProtocolViolationError("the round's server key is invalid") from exc
        self._c_key, self._s_key, self._mac = c_key, s_key, mac
        self.stage = ClientStage.SHARE_KEYS
        return Advertise(self._header(MsgType.ADVERTISE), c_pk, s_pk, sig).encode()

    # -- stage 1 ---------------------------------------------------------------------
    def share_keys(self, roster_blob: bytes) -> bytes:
        """Verify neighbours' signed keys; Shamir-share b_i's seed and the mask key among
        them, each share sealed to its receiver."""
        self._expect(ClientStage.SHARE_KEYS)
        cfg = self.config
        roster = Roster.decode(self._body(roster_blob), cfg.n, cfg.degree)
        check_header(cfg, roster.header, SERVER, self.index)
        peers: dict[int, tuple[bytes, bytes]] = {}
        for e in roster.entries:
            if e.index not in self.neighbours:
                raise ProtocolViolationError(f"roster names {e.index}, not a neighbour")
            stmt = masks.signed_key_statement(self._ctx, e.index, e.c_pk, e.s_pk)
            try:
                verify_signature(self._registry[e.index], e.signature, stmt)
            except (SignatureError, InvalidKeyError) as exc:
                raise BadSignatureError(f"key advertisement of {e.index} does not verify") from exc
            peers[e.index] = (e.c_pk, e.s_pk)
        if len(peers) < cfg.threshold:
            raise SecAggAbortError(
                f"only {len(peers)} live neighbours, threshold is {cfg.threshold}"
            )
        assert self._c_key is not None and self._s_key is not None
        order = sorted(peers)
        xs = [j + 1 for j in order]
        b_seed = os.urandom(32)
        b_shares = share_secret(b_seed, xs, cfg.threshold)
        sk_shares = share_secret(self._s_key.private_bytes(), xs, cfg.threshold)
        envs = []
        channel = {}
        for j, bs, ss in zip(order, b_shares, sk_shares, strict=True):
            try:
                channel[j] = masks.channel_key(self._ctx, self._c_key, self.index, j, peers[j][0])
            except InvalidKeyError as exc:
                raise ProtocolViolationError(f"neighbour {j} advertised an invalid key") from exc
            ctx = masks.context(cfg, Step.SHARE_KEYS, self.index, j)
            envs.append((j, seal(channel[j], ctx, SharePayload(self.index, j, bs, ss).encode())))
        self._peer_keys = peers
        self._channel = channel
        self._b_seed = b_seed
        self.stage = ClientStage.MASKED_INPUT
        return add_mac(self._mac, ShareBundle(self._header(MsgType.SHARES), tuple(envs)).encode())

    # -- stage 2 ---------------------------------------------------------------------
    def masked_input(self, delivery_blob: bytes, x: torch.Tensor | np.ndarray) -> bytes:
        """Open the neighbours' share envelopes, then return y = x + b_i + Σ ±s_ij."""
        self._expect(ClientStage.MASKED_INPUT)
        cfg = self.config
        delivery = Delivery.decode(self._body(delivery_blob), cfg.n, cfg.degree)
        check_header(cfg, delivery.header, SERVER, self.index)
        held: dict[int, tuple[bytes, bytes]] = {}
        ctxs = []
        assert self._c_key is not None and self._s_key is not None and self._b_seed is not None
        for j, env in delivery.envelopes:
            if j not in self._peer_keys:
                raise ProtocolViolationError(f"envelope from {j}, who is not a live neighbour")
            ctx = masks.context(cfg, Step.SHARE_KEYS, j, self.index)
            self._guard.check(ctx)
            try:
                payload = SharePayload.decode(
                    open_envelope(self._channel[j], ctx, env, expected_receiver=cfg.client_ids[self.index])
                )
            except EnvelopeError as exc:
                raise TamperedShareError(f"share envelope from {j} rejected: {exc}") from exc
            if payload.sender != j or payload.receiver != self.index:
                raise ProtocolViolationError("share payload names the wrong parties")
            try:
                decode_share(payload.self_mask_share)
                decode_share(payload.mask_key_share)
            except ShamirError as exc:
                raise MalformedMessageError(f"invalid share from {j}: {exc}") from exc
            held[j] = (payload.self_mask_share, payload.mask_key_share)
            ctxs.append(ctx)
        if len(held) < cfg.threshold:
            raise SecAggAbortError(f"shares from only {len(held)} neighbours, "
                                   f"threshold is {cfg.threshold}")
        y = cfg.spec.encode(x).clone()
        buf = torch.empty(cfg.spec.length, dtype=torch.int64)
        ring_keystream(masks.self_mask_key(self._ctx, self.index, self._b_seed), buf.numel(), out=buf)
        y.add_(buf)
        for j in sorted(held):
            try:
                key = masks.pairwise_mask_key(
                    self._ctx, self._s_key, self.index, j, self._peer_keys[j][1]
                )
            except InvalidKeyError as exc:
                raise ProtocolViolationError(f"neighbour {j} advertised an invalid key") from exc
            masks.add_pairwise_mask(y, key, self.index, j, buf)
        for ctx in ctxs:
            self._guard.accept(ctx)
        self._held = held
        self.stage = ClientStage.UNMASK
        return add_mac(self._mac, MaskedInput(self._header(MsgType.MASKED), y).encode())

    # -- stage 3 ---------------------------------------------------------------------
    def unmask(self, request_blob: bytes) -> bytes:
        """Reveal, for each neighbour whose shares this client holds, the self-mask share if
        it survived or the mask-key share if it dropped: never both, and only once."""
        self._expect(ClientStage.UNMASK)
        cfg = self.config
        req = UnmaskRequest.decode(self._body(request_blob), cfg.n, cfg.degree + 1)
        check_header(cfg, req.header, SERVER, self.index)
        surv, drop = set(req.survivors), set(req.dropped)
        if surv & drop:
            raise ProtocolViolationError("a peer is named both survivor and dropped")
        if self.index not in surv:
            raise ProtocolViolationError("this client is not listed as a survivor")
        surv.discard(self.index)
        if surv | drop != set(self._held):
            raise ProtocolViolationError(
                "survivors and dropped do not partition the neighbours whose shares I hold"
            )
        if req.n_survivors < cfg.min_survivors:
            raise SecAggAbortError(
                f"{req.n_survivors} survivors, fewer than the minimum {cfg.min_survivors}"
            )
        out = []
        for j in sorted(self._held):
            b_share, sk_share = self._held[j]
            if j in surv:
                out.append((j, ShareKind.SELF_MASK, b_share))
            else:
                out.append((j, ShareKind.MASK_KEY, sk_share))
        self._held = {}
        self._channel = {}
        self._c_key = self._s_key = None
        self._b_seed = None
        self.stage = ClientStage.DONE
        msg = UnmaskResponse(self._header(MsgType.UNMASK_RESPONSE), tuple(out)).encode()
        return add_mac(self._mac, msg)

    # -- persistence (devices whose runtime keeps no Python objects between messages) --
    def export_state(self) -> bytes:
        """Serialise the round state, private keys included: store it only on the device."""
        def hx(b: bytes | None) -> str:
            return "" if b is None else b.hex()

        return json.dumps({
            "stage": self.stage.value,
            "c": hx(self._c_key.private_bytes() if self._c_key else None),
            "s": hx(self._s_key.private_bytes() if self._s_key else None),
            "mac": hx(self._mac), "b": hx(self._b_seed),
            "peers": {str(j): [c.hex(), s.hex()] for j, (c, s) in self._peer_keys.items()},
            "channel": {str(j): k.hex() for j, k in self._channel.items()},
            "held": {str(j): [b.hex(), s.hex()] for j, (b, s) in self._held.items()},
        }).encode()

    @classmethod
    def restore(
        cls,
        config: RoundConfig,
        index: int,
        identity: IdentityKey,
        identity_registry: Sequence[bytes],
        state: bytes,
    ) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` output."""
        c = cls(config, index, identity, identity_registry)
        try:
            d = json.loads(state.decode())
            c.stage = ClientStage(d["stage"])
            c._c_key = AgreementKey.from_private_bytes(bytes.fromhex(d["c"])) if d["c"] else None
            c._s_key = AgreementKey.from_private_bytes(bytes.fromhex(d["s"])) if d["s"] else None
            c._mac = bytes.fromhex(d["mac"])
            c._b_seed = bytes.fromhex(d["b"]) if d["b"] else None
            c._peer_keys = {int(j): (bytes.fromhex(a), bytes.fromhex(b))
                            for j, (a, b) in d["peers"].items()}
            c._channel = {int(j): bytes.fromhex(k) for j, k in d["channel"].items()}
            c._held = {int(j): (bytes.fromhex(a), bytes.fromhex(b))
                       for j, (a, b) in d["held"].items()}
        except (ValueError, KeyError, TypeError, InvalidKeyError) as exc:
            raise MalformedMessageError(f"invalid client state: {exc}") from exc
        for j in c._held:  # envelopes already accepted stay rejected
            c._guard.accept(masks.context(config, Step.SHARE_KEYS, j, index))
        return c
