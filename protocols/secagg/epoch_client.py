"""The multi-round SecAgg+ client: keys agreed once per epoch, one masked sum per day, with
a consistency round (Bonawitz et al. CCS 2017 §4, Bell et al. CCS 2020) every day.

Stages: ``ADVERTISE → ROSTER → READY`` once, then per day
``READY → CONSISTENCY → UNMASK → READY``. Each method validates everything before it
changes any state; a rejected message raises a
:class:`~protocols.secagg.errors.SecAggError` subclass and leaves the client unchanged.

What the client reveals on day d, and when: with its tags on the one survivor set S it
accepts for the day (it is in S, |S| ≥ min_survivors, ≥ t live neighbours in S), the day-d
pairwise key with each live neighbour outside S; after it has verified ≥ t tags on the
*identical* S from its own live neighbours in S, the share of b_{j,d} of each live
neighbour j in S. So each neighbour gets one or the other, never both; with 2t > k no
input has t self-mask shares revealed and all its day keys revealed. It never reveals a long-term key, and never uses a server
list other than the S it authenticated. The tags are HMAC-SHA256 under pairwise consistency
keys derived from the epoch's agreed roots (:meth:`EpochContexts.consistency_key`): only
the neighbour checks a tag, so a MAC gives it what a signature would, and the coordinator,
not holding the key, can forge neither.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from collections.abc import Mapping, Sequence
from enum import Enum
from types import MappingProxyType

import numpy as np
import torch

from protocols.envelope import EnvelopeError, open_envelope, seal
from protocols.keys import (
    AgreementKey,
    IdentityKey,
    InvalidKeyError,
    SignatureError,
    verify_signature,
)
from protocols.secagg.config import RoundConfig
from protocols.secagg.epoch_keys import EpochContexts
from protocols.secagg.epoch_messages import (
    SERVER,
    DayInput,
    DayUnmaskRequest,
    DayUnmaskResponse,
    EHeader,
    EMsg,
    EpochAdvertise,
    EpochRoster,
    RevealKind,
    SharePayload,
    SurvivorSet,
    SurvivorTags,
)
from protocols.secagg.errors import (
    BadSignatureError,
    ConfigError,
    MalformedMessageError,
    MisroutedMessageError,
    ProtocolViolationError,
    SecAggAbortError,
    StageError,
    StaleMessageError,
    TamperedShareError,
)
from protocols.secagg.graph import neighbours_of
from protocols.secagg.keystream import ring_keystreams
from protocols.secagg.messages import add_mac, strip_mac
from protocols.secagg.shamir import ShamirError, decode_share, share_secret

__all__ = ["EpochClient", "EpochStage", "check_eheader", "check_day"]

MAX_DAY = 2**63 - 1
_PEER = struct.Struct(">I")
_PEER_ROW = _PEER.size + 3 * 32  # index, channel key, root key, consistency key


def _unpack_peers(raw: bytes) -> tuple[tuple[int, ...], dict[int, bytes], dict[int, bytes],
                                       dict[int, bytes]]:
    """Inverse of the packed peer keys of :meth:`EpochClient.export_state`."""
    if len(raw) % _PEER_ROW:
        raise ValueError("packed peer keys of the wrong size")
    peers: list[int] = []
    channel, roots, cons = {}, {}, {}
    for o in range(0, len(raw), _PEER_ROW):
        (j,) = _PEER.unpack_from(raw, o)
        if peers and j <= peers[-1]:
            raise ValueError("peers must be sorted and distinct")
        peers.append(j)
        channel[j] = raw[o + 4:o + 36]
        roots[j] = raw[o + 36:o + 68]
        cons[j] = raw[o + 68:o + 100]
    return tuple(peers), channel, roots, cons


def _bits_within(new: bytes, old: bytes) -> bool:
    """Whether survivor bitmap ``new`` names a subset of ``old`` (same length)."""
    return len(new) == len(old) and \
        int.from_bytes(new, "little") & ~int.from_bytes(old, "little") == 0


class EpochStage(Enum):
    ADVERTISE = "advertise"
    ROSTER = "roster"
    READY = "ready"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


def check_day(day: object) -> int:
    """A day number: an int (not bool) in [0, 2^63)."""
    if not isinstance(day, int) or isinstance(day, bool) or not 0 <= day <= MAX_DAY:
        raise ConfigError(f"day must be an int in [0, 2^63), got {day!r}")
    return day


def check_eheader(cfg: RoundConfig, header: EHeader, day: int, sender: int,
                  receiver: int) -> None:
    """Reject a header from another run, epoch or day, or with the wrong parties."""
    if header.run_id != cfg.run_id or header.epoch != cfg.round or header.day != day:
        raise StaleMessageError(
            f"message for run {header.run_id!r} epoch {header.epoch} day {header.day}, "
            f"expected {cfg.run_id!r} epoch {cfg.round} day {day}"
        )
    if header.receiver != receiver:
        raise MisroutedMessageError(f"message for {header.receiver}, delivered to {receiver}")
    if header.sender != sender:
        raise MisroutedMessageError(f"message claims sender {header.sender}, came from {sender}")


class EpochClient:
    """One device's side of a SecAgg+ key epoch (many daily sums).

    ``identity_registry`` gives the Ed25519 public keys of roster clients (distributed
    authentically, e.g. at enrolment): either one per roster client (a sequence of n), or
    a mapping from roster index to key that holds at least this client's own. Neighbours'
    key advertisements must verify under them; only this client's and its neighbours'
    entries are read or kept (the neighbours always come from the config's graph seed,
    never from which entries the registry happens to hold), so building a client costs
    O(k) once the process has placed this config's graph (:mod:`protocols.secagg.graph`).
    """

    def __init__(self, config: RoundConfig, index: int, identity: IdentityKey,
                 identity_registry: Sequence[bytes] | Mapping[int, bytes]) -> None:
        self._setup(config, index, identity_registry)
        if identity.public_bytes() != self._registry[index]:
            raise ConfigError("identity key does not match the registry entry")
        self._identity: IdentityKey | None = identity

    def _setup(self, config: RoundConfig, index: int,
               identity_registry: Sequence[bytes] | Mapping[int, bytes]) -> None:
        if not isinstance(config, RoundConfig):
            raise ConfigError("config must be a RoundConfig")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < config.n:
            raise ConfigError(f"index {index!r} outside the roster of {config.n}")
        nbrs = neighbours_of(config.graph_seed, config.n, config.degree, index)
        registry: dict[int, bytes] = {}
        if isinstance(identity_registry, Mapping):
            for j in (index, *nbrs):
                key = identity_registry.get(j)
                if key is not None:
                    registry[j] = bytes(key)
        else:
            if len(identity_registry) != config.n:
                raise ConfigError("identity registry must have one key per roster client")
            registry = {j: bytes(identity_registry[j]) for j in (index, *nbrs)}
        if index not in registry:
            raise ConfigError("the identity registry lacks this client's own key")
        self.config = config
        self.index = index
        self._ctx = EpochContexts(config)
        self._registry = registry  # this client and its neighbours only
        self.neighbours = frozenset(nbrs)
        self.stage = EpochStage.ADVERTISE
        self.last_day: int | None = None
        self._c_key: AgreementKey | None = None
        self._s_key: AgreementKey | None = None
        self._mac = b""
        self._peers: tuple[int, ...] = ()  # live neighbours after setup
        self._channel: dict[int, bytes] = {}
        self._roots: dict[int, bytes] = {}
        self._cons: dict[int, bytes] = {}  # pairwise consistency keys (survivor-set tags)
        self._day: int | None = None
        self._bitmap = b""  # the day's survivor set S this client tagged (bitmap of n)
        self._live_in: tuple[int, ...] = ()  # its live neighbours in S

    @property
    def registry(self) -> Mapping[int, bytes]:
        """The identity keys this client keeps: its own and those of its neighbours it was
        given (read-only)."""
        return MappingProxyType(self._registry)

    # -- helpers ---------------------------------------------------------------------
    def _expect(self, stage: EpochStage) -> None:
        if self.stage is not stage:
            raise StageError(f"client {self.index} is in stage {self.stage.value}, "
                             f"not {stage.value}")

    def _body(self, blob: object) -> bytes:
        limit = 600 + 200 * (self.config.degree + 2) + self.config.n // 8
        return strip_mac(self._mac, blob, limit)

    def _header(self, mtype: EMsg, day: int = 0) -> EHeader:
        cfg = self.config
        return EHeader(mtype, cfg.run_id, cfg.round, day, self.index, SERVER)

    # -- setup -----------------------------------------------------------------------
    def advertise_keys(self) -> bytes:
        """Generate the epoch's channel and mask keys; return the signed advertisement."""
        self._expect(EpochStage.ADVERTISE)
        c_key, s_key = AgreementKey.generate(), AgreementKey.generate()
        c_pk, s_pk = c_key.public_bytes(), s_key.public_bytes()
        if self._identity is None:
            raise StageError(f"client {self.index} was restored without its identity key")
        sig = self._identity.sign(self._ctx.advertise_statement(self.index, c_pk, s_pk))
        try:
            mac = self._ctx.server_mac_key(c_key, self.index, self.config.server_pk)
        except InvalidKeyError as exc:
            raise ProtocolViolationError("the epoch's server key is invalid") from exc
        self._c_key, self._s_key, self._mac = c_key, s_key, mac
        self.stage = EpochStage.ROSTER
        return EpochAdvertise(self._header(EMsg.ADVERTISE), c_pk, s_pk, sig).encode()

    def accept_roster(self, roster_blob: bytes) -> None:
        """Verify the live neighbours' signed keys; derive channel and pairwise root keys."""
        self._expect(EpochStage.ROSTER)
        cfg = self.config
        roster = EpochRoster.decode(self._body(roster_blob), cfg.n, cfg.degree)
        check_eheader(cfg, roster.header, 0, SERVER, self.index)
        assert self._c_key is not None and self._s_key is not None
        channel, roots = {}, {}
        for e in roster.entries:
            if e.index not in self.neighbours:
                raise ProtocolViolationError(f"roster names {e.index}, not a neighbour")
            stmt = self._ctx.advertise_statement(e.index, e.c_pk, e.s_pk)
            known = self._registry.get(e.index)
            if known is None:
                raise BadSignatureError(f"no identity key for neighbour {e.index}: its key "
                                        "advertisement cannot be verified")
            try:
                verify_signature(known, e.signature, stmt)
            except (SignatureError, InvalidKeyError) as exc:
                raise BadSignatureError(f"key advertisement of {e.index} does not verify") from exc
            try:
                channel[e.index], roots[e.index] = self._ctx.pair_keys(
                    self._s_key, self.index, e.index, e.s_pk)
            except InvalidKeyError as exc:
                raise ProtocolViolationError(f"neighbour {e.index} advertised an invalid "
                                             "key") from exc
        if len(roots) < cfg.threshold:
            raise SecAggAbortError(f"only {len(roots)} live neighbours, threshold is "
                                   f"{cfg.threshold}")
        self._peers = tuple(sorted(roots))
        self._channel, self._roots = channel, roots
        self._cons = {j: self._ctx.consistency_key(r, self.index, j) for j, r in roots.items()}
        self._c_key = self._s_key = None  # long-term secrets now live only in derived keys
        self.stage = EpochStage.READY

    # -- day 1/3 -----------------------------------------------------------------------
    def masked_input(self, day: int, x: torch.Tensor | np.ndarray) -> bytes:
        """Share a fresh self-mask seed among the live neighbours (sealed to each) and
        return them with y = x + PRG(b) + Σ ±PRG(day pairwise keys). ``day`` must exceed
        every day this client already took part in; an unfinished earlier day is abandoned."""
        if self.stage not in (EpochStage.READY, EpochStage.CONSISTENCY, EpochStage.UNMASK):
            raise StageError(f"client {self.index} is in stage {self.stage.value}: setup is "
                             "not complete")
        day = check_day(day)
        if self.last_day is not None and day <= self.last_day:
            raise StaleMessageError(f"day {day} is not after day {self.last_day}")
        cfg, ctx, me = self.config, self._ctx, self.index
        y = cfg.spec.encode(x)  # validates before any state changes
        # An unfinished earlier day (the server never completed it) is abandoned: nothing
        # of it was revealed, and its keys are never used again.
        self._bitmap, self._live_in = b"", ()
        b_seed = os.urandom(32)
        shares = share_secret(b_seed, [j + 1 for j in self._peers], cfg.threshold)
        envs = tuple(
            (j, seal(self._channel[j], ctx.share_aad(day, me, j),
                     SharePayload(me, j, sh).encode()))
            for j, sh in zip(self._peers, shares, strict=True)
        )
        peers = self._peers
        pads = ring_keystreams(  # self mask, then one pairwise mask per live neighbour
            [ctx.self_mask_key(b_seed, me, day),
             *ctx.day_pair_keys([self._roots[j] for j in peers], day, me, peers)],
            cfg.spec.length)
        up = np.fromiter((j > me for j in peers), dtype=bool, count=len(peers))
        acc = y.numpy()  # the same int64 storage: mod-2^64 sums, as the ring
        acc += pads[0]
        acc += pads[1:][up].sum(0, dtype=np.int64)
        acc -= pads[1:][~up].sum(0, dtype=np.int64)
        del b_seed
        self.last_day = self._day = day
        self.stage = EpochStage.CONSISTENCY
        return add_mac(self._mac, DayInput(self._header(EMsg.INPUT, day), envs, y).encode())

    # -- day 2/3 -----------------------------------------------------------------------
    def sign_survivors(self, survivors_blob: bytes) -> bytes:
        """Check the day's survivor set S and authenticate it to each live neighbour in S
        (consistency round: one HMAC tag per neighbour)."""
        self._expect(EpochStage.CONSISTENCY)
        assert self._day is not None
        msg, members = SurvivorSet.decode(self._body(survivors_blob), self.config.n)
        check_eheader(self.config, msg.header, self._day, SERVER, self.index)
        return self._sign(msg, members)

    def _sign(self, msg: SurvivorSet, members: frozenset[int]) -> bytes:
        cfg, day = self.config, self._day
        assert day is not None
        if self.index not in members:
            raise ProtocolViolationError("this client is not in the survivor set")
        if len(members) < cfg.min_survivors:
            raise SecAggAbortError(f"{len(members)} survivors, fewer than the minimum "
                                   f"{cfg.min_survivors}")
        live_in = tuple(j for j in self._peers if j in members)
        if len(live_in) < cfg.threshold:
            raise SecAggAbortError("fewer than threshold live neighbours survive")
        digest = self._ctx.survivors_digest(day, msg.bitmap)
        tags = tuple((j, self._ctx.survivors_tag(self._cons[j], self.index, j, digest))
                     for j in live_in)
        # The day keys with live neighbours outside S go now, not at unmask: if this client
        # dies after tagging, its input is still in S and its masks with them must come off.
        # A neighbour gets a day key or (at unmask) a self-mask share, never both: both
        # follow from the one S this client holds for the day.
        day_keys = tuple((j, self._ctx.day_pair_key(self._roots[j], day, self.index, j))
                         for j in self._peers if j not in members)
        self._bitmap, self._live_in = msg.bitmap, live_in
        self.stage = EpochStage.UNMASK
        return add_mac(self._mac, SurvivorTags(self._header(EMsg.TAGS, day), tags,
                                               day_keys).encode())

    def resign_survivors(self, survivors_blob: bytes) -> bytes:
        """A re-issued survivor set for the same day, after this client tagged one and
        before it unmasks: the server left out survivors that sent no tags while they have
        live neighbours outside S (their masks with those can no longer come off). Accepted
        only as a subset of the set this client holds, itself still in it; tagged as in
        :meth:`sign_survivors`, with the day keys of the live neighbours outside the new set.
        A neighbour still gets a day key or a self-mask share, never both: day keys go to
        those outside the smallest set this client tagged, shares to those inside it."""
        self._expect(EpochStage.UNMASK)
        cfg = self.config
        assert self._day is not None
        msg, members = SurvivorSet.decode(self._body(survivors_blob), cfg.n)
        check_eheader(cfg, msg.header, self._day, SERVER, self.index)
        if not _bits_within(msg.bitmap, self._bitmap):
            raise ProtocolViolationError("a re-issued survivor set must be a subset of the "
                                         "one this client tagged")
        held = self._bitmap, self._live_in
        try:
            return self._sign(msg, members)
        except BaseException:
            self._bitmap, self._live_in = held
            self.stage = EpochStage.UNMASK
            raise

    # -- day 3/3 -----------------------------------------------------------------------
    def unmask(self, request_blob: bytes) -> bytes:
        """Verify ≥ t neighbours' tags on this client's S, open the self-mask shares, and
        reveal the share of each live neighbour in S (the day keys with those outside S went
        with the tags)."""
        self._expect(EpochStage.UNMASK)
        cfg, ctx, me = self.config, self._ctx, self.index
        day = self._day
        assert day is not None
        req = DayUnmaskRequest.decode(self._body(request_blob), cfg.n, cfg.degree)
        check_eheader(cfg, req.header, day, SERVER, me)
        live_in = self._live_in
        signers = {j for j, _ in req.tags}
        if not signers <= set(live_in):
            raise ProtocolViolationError("a tag comes from a client that is not a live "
                                         "neighbour in the survivor set")
        if len(signers) < cfg.threshold:
            raise ProtocolViolationError(f"{len(signers)} neighbour tags on the survivor "
                                         f"set, need {cfg.threshold}")
        digest = ctx.survivors_digest(day, self._bitmap)
        good = sum(hmac.compare_digest(ctx.survivors_tag(self._cons[j], j, me, digest), tag)
                   for j, tag in req.tags)
        if good < cfg.threshold:  # an invalid tag counts for nothing (a corrupt neighbour
            # cannot block the day), but t valid ones are needed on this very set
            raise BadSignatureError(f"only {good} of {len(req.tags)} neighbour tags verify on "
                                    f"this survivor set, need {cfg.threshold} (the server "
                                    "equivocated or forged)")
        if {j for j, _ in req.envelopes} != set(live_in):
            raise ProtocolViolationError("self-mask shares must come from exactly the live "
                                         "neighbours in the survivor set")
        held: dict[int, bytes] = {}
        for j, env in req.envelopes:
            try:
                payload = SharePayload.decode(
                    open_envelope(self._channel[j], ctx.share_aad(day, j, me), env)
                )
            except EnvelopeError as exc:
                raise TamperedShareError(f"share envelope from {j} rejected: {exc}") from exc
            if payload.sender != j or payload.receiver != me:
                raise ProtocolViolationError("share payload names the wrong parties")
            try:
                decode_share(payload.share)
            except ShamirError as exc:
                raise MalformedMessageError(f"invalid share from {j}: {exc}") from exc
            held[j] = payload.share
        reveals = tuple((j, RevealKind.SELF_MASK_SHARE, held[j]) for j in live_in)
        self._bitmap, self._live_in, self._day = b"", (), None
        self.stage = EpochStage.READY
        msg = DayUnmaskResponse(self._header(EMsg.UNMASK_RESPONSE, day), reveals)
        return add_mac(self._mac, msg.encode())

    # -- persistence -------------------------------------------------------------------
    def export_state(self) -> bytes:
        """Serialise the epoch state, derived secret keys included: keep it on the device.
        O(k) in size (k = neighbours) plus the day's n-bit survivor bitmap."""
        def hx(b: bytes | None) -> str:
            return "" if b is None else b.hex()

        keys = b"".join(_PEER.pack(j) + self._channel[j] + self._roots[j] + self._cons[j]
                        for j in self._peers)
        return json.dumps({
            "v": 4, "stage": self.stage.value, "last_day": self.last_day, "day": self._day,
            "c": hx(self._c_key.private_bytes() if self._c_key else None),
            "s": hx(self._s_key.private_bytes() if self._s_key else None),
            "mac": self._mac.hex(), "peers": keys.hex(),
            "bitmap": self._bitmap.hex(), "live_in": list(self._live_in),
        }).encode()

    @classmethod
    def restore(cls, config: RoundConfig, index: int, identity: IdentityKey | None,
                identity_registry: Sequence[bytes] | Mapping[int, bytes],
                state: bytes) -> EpochClient:
        """Rebuild a client from :meth:`export_state` output. ``identity`` is needed only
        before the advertisement (the one message it signs); ``None`` skips loading it."""
        if identity is not None:
            c = cls(config, index, identity, identity_registry)
        else:
            c = cls.__new__(cls)
            c._setup(config, index, identity_registry)
            c._identity = None
        if not isinstance(state, (bytes, bytearray)):
            raise MalformedMessageError("client state must be bytes")
        try:
            d = json.loads(bytes(state).decode())
            if d["v"] not in (3, 4):
                raise ValueError("unknown state version")
            c.stage = EpochStage(d["stage"])
            c.last_day = None if d["last_day"] is None else check_day(d["last_day"])
            c._day = None if d["day"] is None else check_day(d["day"])
            c._c_key = AgreementKey.from_private_bytes(bytes.fromhex(d["c"])) if d["c"] else None
            c._s_key = AgreementKey.from_private_bytes(bytes.fromhex(d["s"])) if d["s"] else None
            c._mac = bytes.fromhex(d["mac"])
            c._bitmap = bytes.fromhex(d["bitmap"])
            if d["v"] == 3:  # one hex string per key, and the whole survivor set
                c._peers = tuple(int(j) for j in d["peers"])
                c._channel = {int(j): bytes.fromhex(k) for j, k in d["channel"].items()}
                c._roots = {int(j): bytes.fromhex(k) for j, k in d["roots"].items()}
                c._cons = {int(j): bytes.fromhex(k) for j, k in d["cons"].items()}
                surv = {int(j) for j in d["survivors"]}
                c._live_in = tuple(j for j in c._peers if j in surv)
            else:
                c._peers, c._channel, c._roots, c._cons = _unpack_peers(
                    bytes.fromhex(d["peers"]))
                c._live_in = tuple(int(j) for j in d["live_in"])
        except (ValueError, KeyError, TypeError, AttributeError, InvalidKeyError,
                UnicodeDecodeError) as exc:
            raise MalformedMessageError(f"invalid client state: {exc}") from exc
        if not set(c._peers) <= c.neighbours or set(c._roots) != set(c._peers) \
                or set(c._cons) != set(c._peers) or set(c._channel) != set(c._peers):
            raise MalformedMessageError("client state names peers outside the neighbourhood")
        if c._bitmap and (len(c._bitmap) != -(-config.n // 8) or c._live_in != tuple(
                j for j in c._peers if c._bitmap[j >> 3] >> (j & 7) & 1)):
            raise MalformedMessageError("client state's survivor set does not match its "
                                        "live neighbours in it")
        if not c._bitmap and c._live_in:
            raise MalformedMessageError("client state names survivors without a survivor set")
        if c._identity is None and c.stage is EpochStage.ADVERTISE:
            raise ConfigError("a client that has not advertised needs its identity key")
        return c
