"""The multi-round SecAgg+ server: one key setup per epoch, then one masked sum per day.

Stages: ``ADVERTISE → READY`` once (``ABORTED`` if too few clients complete setup), then per
day ``open_day(d)``: ``INPUT → CONSISTENCY → UNMASK → READY``. The transport feeds client
messages to :meth:`EpochServer.receive` and calls :meth:`EpochServer.advance` to close a
stage (clients not heard from have dropped); ``advance`` returns ``{client: bytes}`` for the
next stage. A rejected message raises a :class:`~protocols.secagg.errors.SecAggError`
naming its sender and changes nothing. A day that cannot complete raises
:class:`~protocols.secagg.errors.SecAggAbortError` *before any client reveals anything*
when the dropouts are known in advance, and leaves the epoch usable for the next day.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import Enum

import numpy as np
import torch

from protocols.keys import (
    AgreementKey,
    InvalidKeyError,
    SignatureError,
    check_agreement_public_key,
    verify_signature,
)
from protocols.secagg.config import RoundConfig
from protocols.secagg.epoch_client import check_day, check_eheader
from protocols.secagg.epoch_keys import EpochContexts
from protocols.secagg.epoch_messages import (
    ENVELOPE_BYTES,
    KEY,
    SERVER,
    DayInput,
    DayUnmaskResponse,
    EHeader,
    EMsg,
    EpochAdvertise,
    EpochRoster,
    RevealKind,
    RosterEntry,
    SurvivorTags,
    encode_bitmap,
    fast_input,
    fast_reveals,
    fast_tags,
    header_prefix,
)
from protocols.secagg.errors import (
    BadSignatureError,
    ConfigError,
    MalformedMessageError,
    ProtocolViolationError,
    ReplayedMessageError,
    SecAggAbortError,
    StageError,
    StaleMessageError,
)
from protocols.secagg.graph import neighbour_graph
from protocols.secagg.keystream import ring_keystreams
from protocols.secagg.messages import add_mac, strip_mac
from protocols.secagg.shamir import (
    SHARE_BYTES,
    InconsistentSharesError,
    ShamirError,
    reconstruct_sorted,
    shares_in_field,
)

_U32 = struct.Struct(">I")
_ENV_ROW, _TAG_ROW = 4 + ENVELOPE_BYTES, 4 + KEY


def _by_receiver(regions: dict[int, bytes], size: int, n: int) -> tuple[np.ndarray, list[int]]:
    """{index: rows of u32 big-endian receiver ‖ ``size`` bytes} (index ascending) →
    (rows, offsets): rows (E, 4 + size) uint8 of u32 big-endian index ‖ entry, ordered by
    receiver then index; receiver r's rows are ``rows[offsets[r]:offsets[r + 1]]``."""
    width = 4 + size
    data = np.frombuffer(b"".join(regions.values()), dtype=np.uint8).reshape(-1, width)
    if not len(data):
        return data, [0] * (n + 1)
    rcv = data[:, :4].copy().view(">u4")[:, 0].astype(np.int64)
    by = np.argsort(rcv, kind="stable")  # stable: index order kept per receiver
    rows = data[by]
    counts = [len(r) // width for r in regions.values()]
    index = np.repeat(np.fromiter(regions, dtype=">u4", count=len(regions)), counts)
    rows[:, :4] = index.view(np.uint8).reshape(-1, 4)[by]
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rcv, minlength=n), out=off[1:])
    return rows, off.tolist()


class EpochServerStage(Enum):
    ADVERTISE = "advertise"
    READY = "ready"
    INPUT = "input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    ABORTED = "aborted"


class _Input:
    """A masked input as the server keeps it: {receiver: envelope} and the vector's int64
    little-endian bytes (``envelopes`` and ``vector`` as on :class:`DayInput`)."""

    __slots__ = ("envs", "raw")

    def __init__(self, envs: dict[int, bytes], raw: bytes) -> None:
        self.envs, self.raw = envs, raw

    @property
    def envelopes(self) -> tuple[tuple[int, bytes], ...]:
        return tuple(sorted(self.envs.items()))

    @property
    def vector(self) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.raw, dtype="<i8").astype(np.int64))


class _Response:
    """An unmask response as the server keeps it: {owner: share of its self-mask seed}
    (``reveals`` as on :class:`DayUnmaskResponse`)."""

    __slots__ = ("shares",)

    def __init__(self, shares: dict[int, bytes]) -> None:
        self.shares = shares

    @property
    def reveals(self) -> tuple[tuple[int, RevealKind, bytes], ...]:
        return tuple((j, RevealKind.SELF_MASK_SHARE, d) for j, d in sorted(self.shares.items()))


_HANDLERS = {
    EpochServerStage.ADVERTISE: "_on_advertise",
    EpochServerStage.INPUT: "_on_input",
    EpochServerStage.CONSISTENCY: "_on_signature",
    EpochServerStage.UNMASK: "_on_unmask",
}


class EpochServer:
    """The coordinator's side of a SecAgg+ key epoch. :attr:`results` maps each completed
    day to its int64 ring sum, :attr:`survivors` to the clients in it."""

    def __init__(self, config: RoundConfig, identity_registry: Sequence[bytes],
                 server_key: AgreementKey) -> None:
        if not isinstance(config, RoundConfig):
            raise ConfigError("config must be a RoundConfig")
        if len(identity_registry) != config.n:
            raise ConfigError("identity registry must have one key per roster client")
        if server_key.public_bytes() != config.server_pk:
            raise ConfigError("server key does not match the epoch's server_pk")
        self.config = config
        self._key = server_key
        self._ctx = EpochContexts(config)
        self._registry = tuple(bytes(k) for k in identity_registry)
        self._nbrs = [frozenset(g) for g in neighbour_graph(config.graph_seed, config.n,
                                                            config.degree)]
        self.stage = EpochServerStage.ADVERTISE
        self._macs: dict[int, bytes] = {}
        self._adverts: dict[int, EpochAdvertise] = {}
        self.live: frozenset[int] = frozenset()
        self.day: int | None = None
        self.last_day: int | None = None
        self._inputs: dict[int, _Input] = {}
        self._s: frozenset[int] = frozenset()
        self._bitmap = b""
        self._tags: dict[int, dict[int, bytes]] = {}  # signer -> {receiver: tag}
        # sender -> its entries as on the wire: rows of u32 receiver ‖ envelope / tag
        self._env_rows: dict[int, bytes] = {}
        self._tag_rows: dict[int, bytes] = {}
        self._day_keys: dict[tuple[int, int], bytes] = {}  # (survivor, dropped) -> day key
        self._responders: frozenset[int] = frozenset()
        self._responses: dict[int, _Response] = {}
        # exact header bytes of the current stage's client messages, up to the sender
        self._head = b""
        self._tails = [struct.pack(">II", i, SERVER) for i in range(config.n)]
        self._idx = [_U32.pack(i) for i in range(config.n)]
        self._in_s: dict[int, frozenset[int]] = {}  # survivor -> its live neighbours in S
        self._out_s: dict[int, frozenset[int]] = {}  # survivor -> live neighbours not in S
        self._live_nbrs: list[frozenset[int]] = [frozenset()] * config.n
        self._share_xs: list[tuple[int, ...]] = []
        self.results: dict[int, torch.Tensor] = {}
        self.survivors: dict[int, frozenset[int]] = {}
        self.result: torch.Tensor | None = None

    # -- public ----------------------------------------------------------------------
    @property
    def tagged(self) -> frozenset[int]:
        """Clients whose consistency tags arrived for the current day (so far)."""
        return frozenset(self._tags)

    @property
    def survivor_set(self) -> frozenset[int]:
        """The current day's survivor set S (empty before the input stage closes)."""
        return self._s

    def neighbours(self, index: int) -> frozenset[int]:
        """The neighbours of roster client ``index`` in the epoch's public graph."""
        return self._nbrs[index]

    def receive(self, sender: int, blob: bytes) -> None:
        """Accept one client message for the current stage (``sender`` = the roster index
        the transport received it from)."""
        if type(sender) is not int or not 0 <= sender < self.config.n:
            raise MalformedMessageError(f"unknown sender {sender!r}")
        name = _HANDLERS.get(self.stage)
        if name is None:
            raise StageError(f"server is {self.stage.value}; no messages accepted")
        getattr(self, name)(sender, blob)

    def open_day(self, day: int) -> None:
        """Start collecting day ``day``'s inputs (days strictly increase)."""
        if self.stage is not EpochServerStage.READY:
            raise StageError(f"server is {self.stage.value}, not ready for a new day")
        day = check_day(day)
        if self.last_day is not None and day <= self.last_day:
            raise StaleMessageError(f"day {day} is not after day {self.last_day}")
        self.day = self.last_day = day
        self.result = None
        self._head = self._prefix(EMsg.INPUT)
        self.stage = EpochServerStage.INPUT

    def abandon_day(self) -> None:
        """Drop an unfinished day (nothing more of it will be revealed); the day number stays
        used. Clients abandon it too when they get the next day's request."""
        if self.stage not in (EpochServerStage.INPUT, EpochServerStage.CONSISTENCY,
                              EpochServerStage.UNMASK):
            raise StageError(f"server is {self.stage.value}; no day to abandon")
        self._clear_day()
        self.stage = EpochServerStage.READY

    def advance(self) -> dict[int, bytes]:
        """Close the current stage; ``{client index: bytes}`` for the next one (empty when a
        day completes). Raises :class:`SecAggAbortError` if too many clients dropped."""
        step = {
            EpochServerStage.ADVERTISE: self._close_advertise,
            EpochServerStage.INPUT: self._close_input,
            EpochServerStage.CONSISTENCY: self._close_consistency,
            EpochServerStage.UNMASK: self._close_unmask,
        }.get(self.stage)
        if step is None:
            raise StageError(f"server is {self.stage.value}; nothing to advance")
        try:
            return step()
        except SecAggAbortError:
            self.stage = (EpochServerStage.ABORTED if self.stage is EpochServerStage.ADVERTISE
                          else EpochServerStage.READY)
            self._clear_day()
            raise

    def decoded(self, day: int | None = None) -> torch.Tensor:
        """The decoded sum of a completed day (default: the last one)."""
        total = self.result if day is None else self.results.get(day)
        if total is None:
            raise StageError("no result: the day has not completed")
        return self.config.spec.decode(total)

    # -- helpers ---------------------------------------------------------------------
    def _clear_day(self) -> None:
        self._inputs, self._tags, self._responses, self._day_keys = {}, {}, {}, {}
        self._env_rows, self._tag_rows = {}, {}
        self._in_s, self._out_s = {}, {}
        self._s, self._responders, self._bitmap = frozenset(), frozenset(), b""

    def _prefix(self, mtype: EMsg) -> bytes:
        assert self.day is not None
        return header_prefix(mtype, self.config.run_id, self.config.round, self.day)

    def _out(self, mtype: EMsg, receiver: int, day: int = 0) -> EHeader:
        cfg = self.config
        return EHeader(mtype, cfg.run_id, cfg.round, day, SERVER, receiver)

    def _body(self, sender: int, blob: object) -> bytes:
        if sender not in self._macs:
            raise ProtocolViolationError(f"client {sender} has not advertised keys")
        cfg = self.config
        limit = 600 + 160 * cfg.degree + 8 * cfg.spec.length
        return strip_mac(self._macs[sender], blob, limit)

    def _check(self, sender: int, header: EHeader, day: int, seen: object,
               allowed: frozenset[int]) -> None:
        check_eheader(self.config, header, day, sender, SERVER)
        if sender in seen:  # type: ignore[operator]
            raise ReplayedMessageError(f"second {header.type.name} message from {sender}")
        if sender not in allowed:
            raise ProtocolViolationError(f"client {sender} is not part of this stage")

    def _prune(self, alive: set[int], within: frozenset[int] | None = None) -> frozenset[int]:
        """Largest subset in which every member keeps ≥ threshold neighbours in it."""
        t = self.config.threshold
        alive = set(alive)
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
            raise SecAggAbortError(f"{len(alive)} clients left after {what}, minimum is "
                                   f"{self.config.min_survivors}")

    # -- setup -------------------------------------------------------------------------
    def _on_advertise(self, sender: int, blob: bytes) -> None:
        msg = EpochAdvertise.decode(blob, self.config.n)
        self._check(sender, msg.header, 0, self._adverts, frozenset(range(self.config.n)))
        stmt = self._ctx.advertise_statement(sender, msg.c_pk, msg.s_pk)
        try:
            verify_signature(self._registry[sender], msg.signature, stmt)
        except (SignatureError, InvalidKeyError) as exc:
            raise BadSignatureError(f"key advertisement of {sender} does not verify") from exc
        try:
            check_agreement_public_key(msg.s_pk)
            mac = self._ctx.server_mac_key(self._key, sender, msg.c_pk)
        except InvalidKeyError as exc:
            raise ProtocolViolationError(f"client {sender} advertised an invalid (low-order) "
                                         "key") from exc
        self._adverts[sender] = msg
        self._macs[sender] = mac

    def _close_advertise(self) -> dict[int, bytes]:
        live = self._prune(set(self._adverts))
        self._require(live, "advertise keys")
        out = {}
        for i in sorted(live):
            entries = tuple(RosterEntry(j, a.c_pk, a.s_pk, a.signature)
                            for j in sorted(self._nbrs[i] & live) for a in (self._adverts[j],))
            out[i] = add_mac(self._macs[i],
                             EpochRoster(self._out(EMsg.ROSTER, i), entries).encode())
        self.live = live
        self._live_nbrs = [nb & live for nb in self._nbrs]
        # x-coordinates each client shares its self-mask seed among (its live neighbours)
        self._share_xs = [tuple(sorted(j + 1 for j in nb)) for nb in self._live_nbrs]
        self.stage = EpochServerStage.READY
        return out

    # -- day 1/3 -----------------------------------------------------------------------
    def _on_input(self, sender: int, blob: bytes) -> None:
        cfg = self.config
        assert self.day is not None
        body = self._body(sender, blob)
        got, start = None, len(self._head) + 12  # header, sender, receiver, count
        if sender not in self._inputs and sender in self.live:
            got = fast_input(body, self._head + self._tails[sender], cfg.degree,
                             cfg.spec.length)
        if got is None or got[0].keys() != self._live_nbrs[sender]:
            start = 0
            msg = DayInput.decode(body, cfg.n, cfg.degree, cfg.spec.length)  # strict path
            self._check(sender, msg.header, self.day, self._inputs, self.live)
            got = dict(msg.envelopes), msg.vector.numpy().astype("<i8").tobytes()
            if got[0].keys() != self._live_nbrs[sender]:
                raise ProtocolViolationError(f"client {sender} did not share its self mask "
                                             "with exactly its live neighbours")
        self._inputs[sender] = _Input(*got)
        self._env_rows[sender] = (  # fast path: the rows exactly as received
            body[start : start + len(got[0]) * _ENV_ROW] if start else
            b"".join([_U32.pack(j) + e for j, e in got[0].items()]))

    def _headers(self, mtype: EMsg, receivers: Sequence[int]) -> list[bytes]:
        """The encoded headers (server → each receiver) of the current day's ``mtype``:
        identical bytes to ``EHeader(...).encode()``, the common prefix encoded once."""
        assert self.day is not None
        prefix = self._out(mtype, 0, self.day).encode()[: -_U32.size]
        return [prefix + _U32.pack(i) for i in receivers]

    def _close_input(self) -> dict[int, bytes]:
        assert self.day is not None
        s = self._prune(set(self._inputs))
        self._require(s, "masked input")
        self._s = s
        self._bitmap = encode_bitmap(s, self.config.n)
        order = sorted(s)
        tail = _U32.pack(len(self._bitmap)) + self._bitmap  # SurvivorSet body after header
        macs = self._macs
        out = {i: add_mac(macs[i], head + tail)
               for i, head in zip(order, self._headers(EMsg.SURVIVORS, order), strict=True)}
        live = self._live_nbrs
        self._in_s = {i: live[i] & s for i in order}
        self._out_s = {i: live[i] - s for i in order}
        self._head = self._prefix(EMsg.TAGS)
        self.stage = EpochServerStage.CONSISTENCY
        return out

    # -- day 2/3 -----------------------------------------------------------------------
    def _on_signature(self, sender: int, blob: bytes) -> None:
        cfg = self.config
        assert self.day is not None
        body = self._body(sender, blob)
        got, start = None, len(self._head) + 12
        if sender not in self._tags and sender in self._s:
            got = fast_tags(body, self._head + self._tails[sender], cfg.degree)
        # one tag per live neighbour in S: the server cannot check a tag (it does not hold
        # the pair's key), only that the sender addressed exactly its neighbours in S
        if (got is None or got[0].keys() != self._in_s[sender]
                or got[1].keys() != self._out_s[sender]):
            start = 0
            msg = SurvivorTags.decode(body, cfg.n, cfg.degree)  # strict path
            self._check(sender, msg.header, self.day, self._tags, self._s)
            got = dict(msg.tags), dict(msg.day_keys)
            if got[0].keys() != self._in_s[sender]:
                raise ProtocolViolationError(f"client {sender} did not tag the survivor set "
                                             "for exactly its live neighbours in it")
            if got[1].keys() != self._out_s[sender]:
                raise ProtocolViolationError(f"client {sender} did not reveal its day keys "
                                             "with exactly its live neighbours outside the "
                                             "survivor set")
        self._tags[sender] = got[0]
        self._tag_rows[sender] = (
            body[start : start + len(got[0]) * _TAG_ROW] if start else
            b"".join([_U32.pack(j) + t for j, t in got[0].items()]))
        self._day_keys.update(((sender, j), key) for j, key in got[1].items())

    def _close_consistency(self) -> dict[int, bytes]:
        cfg = self.config
        assert self.day is not None
        signers = frozenset(self._tags)
        responders = self._prune(set(signers))
        # Check, before any self-mask share is revealed, that the day can complete if every
        # responder answers: each b_i needs t holders, and every mask between a survivor and
        # a neighbour outside S needs the day key the survivor sent with its tags.
        for i in sorted(self._s):
            holders = len(self._nbrs[i] & responders)
            if holders < cfg.threshold:
                raise SecAggAbortError(f"self mask of client {i} has {holders} holders able to "
                                       f"reveal, threshold {cfg.threshold}: aborting the day "
                                       "before unmasking")
            if i not in signers and self._live_nbrs[i] - self._s:
                raise SecAggAbortError(f"client {i} sent no tags, so it cannot reveal its day "
                                       "keys with dropped neighbours: aborting the day "
                                       "before unmasking")
        order = sorted(responders)
        macs, idx = self._macs, self._idx
        # DayUnmaskRequest body for i: the tags addressed to i (index = signer), then the
        # envelopes addressed to i (index = sender, senders in S only), each list sorted by
        # index: all entries of the day as rows, ordered by (receiver, index) in one sort.
        tags, t_off = _by_receiver({j: self._tag_rows[j] for j in sorted(self._tag_rows)},
                                   KEY, cfg.n)
        envs, e_off = _by_receiver({j: self._env_rows[j] for j in sorted(self._s)},
                                   ENVELOPE_BYTES, cfg.n)
        out = {}
        for i, head in zip(order, self._headers(EMsg.UNMASK_REQUEST, order), strict=True):
            t0, t1, e0, e1 = t_off[i], t_off[i + 1], e_off[i], e_off[i + 1]
            out[i] = add_mac(macs[i], b"".join((head, idx[t1 - t0], tags[t0:t1].tobytes(),
                                                  idx[e1 - e0], envs[e0:e1].tobytes())))
        self._responders = responders
        self._head = self._prefix(EMsg.UNMASK_RESPONSE)
        self.stage = EpochServerStage.UNMASK
        return out

    def reissue_survivors(self) -> dict[int, bytes]:
        """At CONSISTENCY, instead of :meth:`advance`: survivors that sent no tags while
        they have live neighbours outside S (they dropped after their masked input) would
        abort the day, since nobody else holds their day keys with those neighbours. Left
        out of a re-issued S' ⊂ S (pruned so every member keeps ≥ t neighbours in it),
        their inputs stay out of the sum exactly: their self masks are never revealed and
        their neighbours send their day keys with them. Returns the survivor-set messages
        for S' (clients that tagged S answer with ``EpochClient.resign_survivors``; the
        stage stays CONSISTENCY), or ``{}`` when no survivor is in that case. Raises
        :class:`SecAggAbortError` (the day dropped, nothing revealed) if S' is too small."""
        if self.stage is not EpochServerStage.CONSISTENCY:
            raise StageError(f"server is {self.stage.value}, not in the consistency round")
        live, s = self._live_nbrs, set(self._s)
        silent: set[int] = set()
        while True:  # leaving one out can put another silent survivor next to an outsider
            more = {i for i in s if i not in self._tags and live[i] - s}
            if not more:
                break
            silent |= more
            s -= more
        if not silent:
            return {}
        s2 = self._prune(s)
        try:
            self._require(s2, "re-issuing the survivor set")
        except SecAggAbortError:
            self.stage = EpochServerStage.READY
            self._clear_day()
            raise
        self._s = s2
        self._bitmap = encode_bitmap(s2, self.config.n)
        order = sorted(s2)
        tail = _U32.pack(len(self._bitmap)) + self._bitmap
        macs = self._macs
        out = {i: add_mac(macs[i], head + tail)
               for i, head in zip(order, self._headers(EMsg.SURVIVORS, order), strict=True)}
        self._in_s = {i: live[i] & s2 for i in order}
        self._out_s = {i: live[i] - s2 for i in order}
        self._tags, self._day_keys = {}, {}  # S' is tagged afresh, day keys with it
        self._tag_rows = {}
        self._head = self._prefix(EMsg.TAGS)
        return out

    # -- day 3/3 -----------------------------------------------------------------------
    def _on_unmask(self, sender: int, blob: bytes) -> None:
        cfg = self.config
        assert self.day is not None
        body = self._body(sender, blob)
        expected = self._nbrs[sender] & self._s
        got = None
        if sender not in self._responses and sender in self._responders:
            got = fast_reveals(body, self._head + self._tails[sender], cfg.degree)
        if got is None or got.keys() != expected:
            msg = DayUnmaskResponse.decode(body, cfg.n, cfg.degree)  # strict path
            self._check(sender, msg.header, self.day, self._responses, self._responders)
            if {j: k for j, k, _ in msg.reveals} != dict.fromkeys(
                    expected, RevealKind.SELF_MASK_SHARE):
                raise ProtocolViolationError(f"unmask response of {sender} does not match "
                                             "the survivor set")
            if not shares_in_field([data for _, _, data in msg.reveals]):
                raise MalformedMessageError(f"invalid share from {sender}: share element "
                                            "outside the field")
            got = {j: data for j, _, data in msg.reveals}
        self._responses[sender] = _Response(got)

    def _close_unmask(self) -> dict[int, bytes]:
        cfg, ctx = self.config, self._ctx
        day = self.day
        assert day is not None
        order = sorted(self._s)
        # every revealed share as one row: owner, holder x = responder + 1, 48 bytes
        owners: list[int] = []
        rows: list[bytes] = []
        holders: list[int] = []
        for r in sorted(self._responses):
            got = self._responses[r].shares
            owners += got
            rows += got.values()
            holders.append(len(got))
        xs = np.repeat(np.array(sorted(self._responses), dtype=np.int64) + 1, holders)
        own = np.array(owners, dtype=np.int64)
        by = np.lexsort((xs, own))  # by owner, then holder x
        counts = np.bincount(own, minlength=cfg.n)[order] if len(own) else np.zeros(
            len(order), dtype=np.int64)
        for i, c in zip(order, counts.tolist(), strict=True):
            if c < cfg.threshold:
                raise SecAggAbortError(f"only {c} shares of client {i}'s self "
                                       f"mask, threshold {cfg.threshold}")
        shares = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, SHARE_BYTES)[by]
        try:  # each seed from all its shares: a wrong one among them is detected
            seeds = reconstruct_sorted(xs[by], counts.tolist(), shares, cfg.threshold,
                                       [self._share_xs[i] for i in order])
        except InconsistentSharesError as exc:
            who = order[exc.item] if exc.item is not None else "?"
            raise ProtocolViolationError(
                f"the shares of client {who}'s self mask are inconsistent: a holder revealed "
                "a wrong share (not attributable)") from exc
        except ShamirError as exc:
            raise ProtocolViolationError(f"self-mask reconstruction failed: {exc}") from exc
        length = cfg.spec.length
        raw = b"".join([self._inputs[i].raw for i in order])
        total = np.frombuffer(raw, dtype="<i8").reshape(len(order), length).sum(
            0, dtype=np.int64)  # wraps mod 2^64, as the ring requires
        masks = ring_keystreams(ctx.self_mask_keys(seeds, order, day), length)
        total -= masks.sum(0)
        if self._day_keys:  # i added +mask if i < j, else −mask: undo it
            pairs = sorted(self._day_keys.items())
            sign = np.array([-1 if i < j else 1 for (i, j), _ in pairs], dtype=np.int64)
            pads = ring_keystreams([key for _, key in pairs], length)
            total += (pads * sign[:, None]).sum(0)
        self.results[day] = self.result = torch.from_numpy(total)
        self.survivors[day] = self._s
        self._clear_day()
        self.stage = EpochServerStage.READY
        return {}
