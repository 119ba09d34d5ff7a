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

import functools
import struct
from collections.abc import Callable, Iterable, Sequence
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
    header_prefix,
    reveals_ok,
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
from protocols.secagg.messages import MAC_BYTES, MacKey, add_mac, strip_mac
from protocols.secagg.shamir import (
    SHARE_BYTES,
    InconsistentSharesError,
    ShamirError,
    reconstruct_sorted,
    shares_in_field,
)

_U32 = struct.Struct(">I")
_ENV_ROW, _TAG_ROW, _SHARE_ROW = 4 + ENVELOPE_BYTES, 4 + KEY, 5 + SHARE_BYTES


@functools.lru_cache(maxsize=4096)
def _layout(fmt: str) -> Callable[[bytes, int], tuple[int, ...]]:
    """``Struct(fmt).unpack_from`` (cached): the fixed integer fields of an exact layout."""
    return struct.Struct(fmt).unpack_from


def _input_layout(count: int) -> Callable[[bytes, int], tuple[int, ...]]:
    """DayInput after the header prefix: sender, receiver, count, receivers, length."""
    return _layout(">III" + f"I{ENVELOPE_BYTES}x" * count + "I")


def _tags_layout(tags: int, keys: int) -> Callable[[bytes, int], tuple[int, ...]]:
    """SurvivorTags after the header prefix: sender, receiver, count, receivers, count,
    dropped neighbours."""
    return _layout(">III" + f"I{KEY}x" * tags + "I" + f"I{KEY}x" * keys)


def _reveals_layout(count: int) -> Callable[[bytes, int], tuple[int, ...]]:
    """DayUnmaskResponse after the header prefix: sender, receiver, count, owners (the
    kind byte and the share skipped: checked apart)."""
    return _layout(">III" + f"I1x{SHARE_BYTES}x" * count)


class _Rows:
    """Entry rows cut out of many messages without a copy per message: the messages joined
    once, and the byte position of each row (message b's ``counts[b]`` rows of ``width``
    bytes start at byte ``offset`` (+ ``skip[b]``) of it)."""

    def __init__(self, blobs: list[bytes], offset: int, counts: np.ndarray, width: int,
                 skip: np.ndarray | None = None) -> None:
        self.width, self.total = width, int(counts.sum())
        sizes = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
        starts = np.cumsum(sizes) - sizes + offset
        if skip is not None:
            starts += skip
        ends = np.cumsum(counts)
        self.pos = (np.repeat(starts - width * (ends - counts), counts)
                    + width * np.arange(self.total))
        self.joined = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def take(self, pos: np.ndarray, width: int, at: int = 0) -> np.ndarray:
        """Bytes ``at .. at + width`` of the rows at ``pos`` → (len(pos), width) uint8 (one
        gather of ``width``-byte items)."""
        if not len(pos):
            return np.zeros((0, width), dtype=np.uint8)
        items = np.ndarray(shape=(len(self.joined) - width + 1,), dtype=f"V{width}",
                           buffer=self.joined, strides=(1,))
        return items[pos + at].view(np.uint8).reshape(-1, width)

    def u32(self, pos: np.ndarray, at: int = 0) -> np.ndarray:
        """The u32 big-endian field at byte ``at`` of the rows at ``pos``, as int64."""
        return self.take(pos, 4, at).view(">u4")[:, 0].astype(np.int64)


def _stable_order(keys: np.ndarray, n: int) -> np.ndarray:
    """Stable argsort of roster indices ``keys`` (< ``n``): as uint16 when they fit, where
    NumPy's stable sort is a radix sort."""
    return np.argsort(keys.astype(np.uint16) if n <= 1 << 16 else keys, kind="stable")


def _by_receiver(rows: _Rows, senders: Sequence[int], counts: np.ndarray, n: int
                 ) -> tuple[memoryview, list[int]]:
    """Rows of u32 big-endian receiver ‖ entry, sender b's ``counts[b]`` rows in the order
    of ``senders`` (ascending) → (rows, offsets): ordered by receiver then sender, with the
    receiver replaced by the sender (u32 big-endian); receiver r's rows are bytes
    ``[offsets[r] · width, offsets[r + 1] · width)``."""
    if not rows.total:
        return memoryview(b""), [0] * (n + 1)
    rcv = rows.u32(rows.pos)
    by = _stable_order(rcv, n)  # senders stay ascending per receiver
    out = rows.take(rows.pos[by], rows.width)
    out[:, :4] = np.repeat(np.array(senders, dtype=">u4"), counts)[by].view(
        np.uint8).reshape(-1, 4)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rcv, minlength=n), out=off[1:])
    return out.reshape(-1).data, off.tolist()


class EpochServerStage(Enum):
    ADVERTISE = "advertise"
    READY = "ready"
    INPUT = "input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    ABORTED = "aborted"


class _Matrix:
    """The neighbour lists as an (n, k) int64 matrix, rows padded with n (a sentinel that
    is never a member of a set); compared by identity, as the graph object it stands for."""

    __slots__ = ("m",)

    def __init__(self, graph: Sequence[Sequence[int]], n: int) -> None:
        self.m = np.full((n, max(map(len, graph), default=0)), n, dtype=np.int64)
        for i, g in enumerate(graph):
            self.m[i, : len(g)] = g


_HANDLERS = {
    EpochServerStage.ADVERTISE: "_on_advertise",
    EpochServerStage.INPUT: "_on_input",
    EpochServerStage.CONSISTENCY: "_on_signature",
    EpochServerStage.UNMASK: "_on_unmask",
}


class EpochServer:
    """The coordinator's side of a SecAgg+ key epoch. :attr:`results` maps each completed
    day to its int64 ring sum, :attr:`survivors` to the clients in it.

    A day's client messages are kept as received (MAC included) once accepted, and the
    entry rows the coordinator routes or uses are cut out of all of them at once when a
    stage closes. Receipt runs every check of the strict decoders: one ``struct`` read of
    the fixed fields (sender, receiver, counts, indices) compared with the expected tuple
    accepts the canonical encoding; anything else goes to the strict decoder, which accepts
    the same messages and raises the precise error."""

    def __init__(self, config: RoundConfig, identity_registry: Sequence[bytes],
                 server_key: AgreementKey) -> None:
        if not isinstance(config, RoundConfig):
            raise ConfigError("config must be a RoundConfig")
        if len(identity_registry) != config.n:
            raise ConfigError("identity registry must have one key per roster client")
        if server_key.public_bytes() != config.server_pk:
            raise ConfigError("server key does not match the epoch's server_pk")
        self.config = config
        self._n = config.n
        self._key = server_key
        self._ctx = EpochContexts(config)
        self._registry = tuple(bytes(k) for k in identity_registry)
        graph = neighbour_graph(config.graph_seed, config.n, config.degree)
        self._nbrs = [frozenset(g) for g in graph]
        self._graph = _Matrix(graph, config.n)
        self.stage = EpochServerStage.ADVERTISE
        self._macs: dict[int, bytes] = {}
        self._mk: list[MacKey | None] = [None] * config.n
        self._adverts: dict[int, EpochAdvertise] = {}
        self.live: frozenset[int] = frozenset()
        self.day: int | None = None
        self.last_day: int | None = None
        self._s: frozenset[int] = frozenset()
        self._s_order: list[int] = []
        self._bitmap = b""
        # the day's accepted client messages as received (MAC included), by sender
        self._in_blobs: dict[int, bytes] = {}
        self._tag_blobs: dict[int, bytes] = {}
        self._un_blobs: dict[int, bytes] = {}
        self._responders: frozenset[int] = frozenset()
        # exact header bytes of the current stage's client messages, up to the sender
        self._head = b""
        self._idx = [_U32.pack(i) for i in range(config.n)]
        self._live_nbrs: list[frozenset[int]] = [frozenset()] * config.n
        self._share_xs: list[tuple[int, ...]] = []
        # exact layouts: the expected fixed fields and the size of each client's messages
        self._in_exp: list[tuple[int, ...]] = [()] * config.n  # sender, SERVER, c, nbrs, L
        self._in_size = [-1] * config.n
        self._in_t: dict[int, tuple[int, ...]] = {}  # survivor -> (count, live nbrs in S)
        self._out_t: dict[int, tuple[int, ...]] = {}  # survivor -> (count, live nbrs not in S)
        self._tag_size: dict[int, int] = {}
        self.results: dict[int, torch.Tensor] = {}
        self.survivors: dict[int, frozenset[int]] = {}
        self.result: torch.Tensor | None = None

    # -- public ----------------------------------------------------------------------
    @property
    def tagged(self) -> frozenset[int]:
        """Clients whose consistency tags arrived for the current day (so far)."""
        return frozenset(self._tag_blobs)

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
        if type(sender) is not int or not 0 <= sender < self._n:
            raise MalformedMessageError(f"unknown sender {sender!r}")
        handler = self._recv
        if handler is None:
            raise StageError(f"server is {self.stage.value}; no messages accepted")
        handler(self, sender, blob)

    @property
    def stage(self) -> EpochServerStage:
        """Where the epoch stands (which messages :meth:`receive` accepts)."""
        return self._stage

    @stage.setter
    def stage(self, value: EpochServerStage) -> None:
        self._stage = value
        name = _HANDLERS.get(value)
        self._recv: Callable[[EpochServer, int, bytes], None] | None = (
            None if name is None else getattr(EpochServer, name))

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

    # -- the day's accepted messages, decoded (for inspection; the stages cut rows) ----
    @property
    def _inputs(self) -> dict[int, DayInput]:
        cfg = self.config
        return {i: DayInput.decode(b[:-MAC_BYTES], cfg.n, cfg.degree, cfg.spec.length)
                for i, b in sorted(self._in_blobs.items())}

    @property
    def _responses(self) -> dict[int, DayUnmaskResponse]:
        cfg = self.config
        return {i: DayUnmaskResponse.decode(b[:-MAC_BYTES], cfg.n, cfg.degree)
                for i, b in sorted(self._un_blobs.items())}

    @property
    def _day_keys(self) -> dict[tuple[int, int], bytes]:
        """(survivor, dropped neighbour) → the day's pairwise mask key, as revealed."""
        cfg = self.config
        return {(i, j): key for i, b in sorted(self._tag_blobs.items())
                for j, key in SurvivorTags.decode(b[:-MAC_BYTES], cfg.n, cfg.degree).day_keys}

    # -- helpers ---------------------------------------------------------------------
    def _clear_day(self) -> None:
        self._in_blobs, self._tag_blobs, self._un_blobs = {}, {}, {}
        self._in_t, self._out_t, self._tag_size = {}, {}, {}
        self._s, self._s_order, self._responders = frozenset(), [], frozenset()
        self._bitmap = b""

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

    def _mask(self, members: Iterable[int]) -> np.ndarray:
        """Membership of roster indices as bools, n + 1 of them (the last is the
        sentinel of the neighbour matrix, never a member)."""
        mask = np.zeros(self.config.n + 1, dtype=bool)
        mask[np.fromiter(members, dtype=np.int64)] = True
        return mask

    def _prune(self, alive: Iterable[int]) -> frozenset[int]:
        """Largest subset in which every member keeps ≥ threshold neighbours in it (the
        threshold-core: removing all members below it at once, until none is, reaches the
        same set as removing them one at a time)."""
        t, mask = self.config.threshold, self._mask(alive)
        while True:
            low = mask[:-1] & (mask[self._graph.m].sum(axis=1) < t)
            if not low.any():
                return frozenset(np.flatnonzero(mask[:-1]).tolist())
            mask[:-1] &= ~low

    def _require(self, alive: frozenset[int], what: str) -> None:
        if len(alive) < self.config.min_survivors:
            raise SecAggAbortError(f"{len(alive)} clients left after {what}, minimum is "
                                   f"{self.config.min_survivors}")

    def _keep(self, store: dict[int, bytes], sender: int, body: bytes, blob: object) -> None:
        """Keep a message the strict path accepted as the fast path would: body ‖ MAC
        (its layout is the exact one, entries perhaps in another order)."""
        store[sender] = body + bytes(blob)[-MAC_BYTES:]  # type: ignore[call-overload]

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
        self._mk[sender] = MacKey(mac)

    def _close_advertise(self) -> dict[int, bytes]:
        cfg = self.config
        live = self._prune(self._adverts)
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
        # a day's masked input from i: its live neighbours (ascending), then the length
        head, length = len(header_prefix(EMsg.INPUT, cfg.run_id, cfg.round, 0)), cfg.spec.length
        for i in live:
            c = len(self._live_nbrs[i])
            self._in_exp[i] = (i, SERVER, c, *sorted(self._live_nbrs[i]), length)
            self._in_size[i] = head + 12 + c * _ENV_ROW + 4 + 8 * length + MAC_BYTES
        self.stage = EpochServerStage.READY
        return out

    # -- day 1/3 -----------------------------------------------------------------------
    def _on_input(self, sender: int, blob: bytes) -> None:
        exp = self._in_exp[sender]
        if (type(blob) is bytes and len(blob) == self._in_size[sender]
                and sender not in self._in_blobs and blob.startswith(self._head)
                and _input_layout(exp[2])(blob, len(self._head)) == exp
                and self._mk[sender].verify(blob)):  # type: ignore[union-attr]
            self._in_blobs[sender] = blob  # the exact layout: rows are cut out at close
            return
        cfg = self.config
        assert self.day is not None
        body = self._body(sender, blob)
        msg = DayInput.decode(body, cfg.n, cfg.degree, cfg.spec.length)  # strict path
        self._check(sender, msg.header, self.day, self._in_blobs, self.live)
        if {j for j, _ in msg.envelopes} != self._live_nbrs[sender]:
            raise ProtocolViolationError(f"client {sender} did not share its self mask "
                                         "with exactly its live neighbours")
        self._keep(self._in_blobs, sender, body, blob)

    def _headers(self, mtype: EMsg, receivers: Sequence[int]) -> list[bytes]:
        """The encoded headers (server → each receiver) of the current day's ``mtype``:
        identical bytes to ``EHeader(...).encode()``, the common prefix encoded once."""
        assert self.day is not None
        prefix = self._out(mtype, 0, self.day).encode()[: -_U32.size]
        return [prefix + _U32.pack(i) for i in receivers]

    def _announce(self, s: frozenset[int]) -> dict[int, bytes]:
        """Make ``s`` the day's survivor set: its SurvivorSet messages, and the layout of
        the tags each member must send (its live neighbours in S, then those outside S,
        each ascending)."""
        cfg = self.config
        self._s = s
        self._s_order = order = sorted(s)
        self._bitmap = encode_bitmap(s, cfg.n)
        tail = _U32.pack(len(self._bitmap)) + self._bitmap  # SurvivorSet body after header
        mk, out = self._mk, {}
        for i, head in zip(order, self._headers(EMsg.SURVIVORS, order), strict=True):
            body = head + tail
            out[i] = body + mk[i].tag(body)  # type: ignore[union-attr]
        nb = self._graph.m[order]
        live, member = self._mask(self.live)[nb], self._mask(s)[nb]
        inside, outside = live & member, live & ~member
        ins, outs = nb[inside].tolist(), nb[outside].tolist()
        self._head = self._prefix(EMsg.TAGS)
        fixed = len(self._head) + 16 + MAC_BYTES  # header, sender, receiver, two counts
        self._in_t, self._out_t, self._tag_size = {}, {}, {}
        a = b = 0
        for i, ci, co in zip(order, inside.sum(axis=1).tolist(), outside.sum(axis=1).tolist(),
                             strict=True):
            self._in_t[i] = (ci, *ins[a : a + ci])
            self._out_t[i] = (co, *outs[b : b + co])
            self._tag_size[i] = fixed + (ci + co) * _TAG_ROW
            a += ci
            b += co
        return out

    def _close_input(self) -> dict[int, bytes]:
        s = self._prune(self._in_blobs)
        self._require(s, "masked input")
        out = self._announce(s)
        self.stage = EpochServerStage.CONSISTENCY
        return out

    # -- day 2/3 -----------------------------------------------------------------------
    def _on_signature(self, sender: int, blob: bytes) -> None:
        if (type(blob) is bytes and len(blob) == self._tag_size.get(sender)
                and sender not in self._tag_blobs and blob.startswith(self._head)):
            ins, outs = self._in_t[sender], self._out_t[sender]
            if (_tags_layout(ins[0], outs[0])(blob, len(self._head))
                    == (sender, SERVER, *ins, *outs)
                    and self._mk[sender].verify(blob)):  # type: ignore[union-attr]
                self._tag_blobs[sender] = blob
                return
        cfg = self.config
        assert self.day is not None
        body = self._body(sender, blob)
        in_s = frozenset(self._in_t.get(sender, (0,))[1:])
        out_s = frozenset(self._out_t.get(sender, (0,))[1:])
        # one tag per live neighbour in S: the server cannot check a tag (it does not hold
        # the pair's key), only that the sender addressed exactly its neighbours in S
        msg = SurvivorTags.decode(body, cfg.n, cfg.degree)  # strict path
        self._check(sender, msg.header, self.day, self._tag_blobs, self._s)
        if {j for j, _ in msg.tags} != in_s:
            raise ProtocolViolationError(f"client {sender} did not tag the survivor set "
                                         "for exactly its live neighbours in it")
        if {j for j, _ in msg.day_keys} != out_s:
            raise ProtocolViolationError(f"client {sender} did not reveal its day keys "
                                         "with exactly its live neighbours outside the "
                                         "survivor set")
        self._keep(self._tag_blobs, sender, body, blob)

    def _close_consistency(self) -> dict[int, bytes]:
        cfg = self.config
        assert self.day is not None
        responders = self._prune(self._tag_blobs)
        # Check, before any self-mask share is revealed, that the day can complete if every
        # responder answers: each b_i needs t holders, and every mask between a survivor and
        # a neighbour outside S needs the day key the survivor sent with its tags.
        order = self._s_order
        holders = self._mask(responders)[self._graph.m[order]].sum(axis=1)
        few = holders < cfg.threshold
        silent = ~self._mask(self._tag_blobs)[order] & np.array(
            [self._out_t[i][0] > 0 for i in order], dtype=bool)
        if few.any() or silent.any():
            at = int(np.argmax(few | silent))  # the first in roster order, as one by one
            if few[at]:
                raise SecAggAbortError(f"self mask of client {order[at]} has {holders[at]} "
                                       f"holders able to reveal, threshold {cfg.threshold}: "
                                       "aborting the day before unmasking")
            raise SecAggAbortError(f"client {order[at]} sent no tags, so it cannot reveal its "
                                   "day keys with dropped neighbours: aborting the day "
                                   "before unmasking")
        # DayUnmaskRequest body for i: the tags addressed to i (index = signer), then the
        # envelopes addressed to i (index = sender, senders in S only), each list sorted by
        # index: all entries of the day as rows, ordered by (receiver, index) in one sort.
        pos = len(self._head) + 12  # header, sender, receiver, count
        signers = sorted(self._tag_blobs)
        t_cnt = np.array([self._in_t[j][0] for j in signers], dtype=np.int64)
        tb, t_off = _by_receiver(_Rows([self._tag_blobs[j] for j in signers], pos, t_cnt,
                                       _TAG_ROW), signers, t_cnt, cfg.n)
        e_cnt = np.array([self._in_exp[j][2] for j in order], dtype=np.int64)
        eb, e_off = _by_receiver(_Rows([self._in_blobs[j] for j in order], pos, e_cnt,
                                       _ENV_ROW), order, e_cnt, cfg.n)
        mk, idx, out = self._mk, self._idx, {}
        resp = sorted(responders)
        for i, head in zip(resp, self._headers(EMsg.UNMASK_REQUEST, resp), strict=True):
            t0, t1, e0, e1 = t_off[i], t_off[i + 1], e_off[i], e_off[i + 1]
            body = b"".join((head, idx[t1 - t0], tb[t0 * _TAG_ROW : t1 * _TAG_ROW],
                             idx[e1 - e0], eb[e0 * _ENV_ROW : e1 * _ENV_ROW]))
            out[i] = body + mk[i].tag(body)  # type: ignore[union-attr]
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
            more = {i for i in s if i not in self._tag_blobs and live[i] - s}
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
        self._tag_blobs = {}  # S' is tagged afresh, day keys with it
        return self._announce(s2)

    # -- day 3/3 -----------------------------------------------------------------------
    def _on_unmask(self, sender: int, blob: bytes) -> None:
        ins = self._in_t.get(sender) if sender in self._responders else None
        pos = len(self._head)
        if (ins is not None and type(blob) is bytes and sender not in self._un_blobs
                and len(blob) == pos + 12 + ins[0] * _SHARE_ROW + MAC_BYTES
                and blob.startswith(self._head)
                and _reveals_layout(ins[0])(blob, pos) == (sender, SERVER, *ins)
                and reveals_ok(blob, pos + 12, ins[0])
                and self._mk[sender].verify(blob)):  # type: ignore[union-attr]
            self._un_blobs[sender] = blob
            return
        cfg = self.config
        assert self.day is not None
        body = self._body(sender, blob)
        expected = self._nbrs[sender] & self._s
        msg = DayUnmaskResponse.decode(body, cfg.n, cfg.degree)  # strict path
        self._check(sender, msg.header, self.day, self._un_blobs, self._responders)
        if {j: k for j, k, _ in msg.reveals} != dict.fromkeys(
                expected, RevealKind.SELF_MASK_SHARE):
            raise ProtocolViolationError(f"unmask response of {sender} does not match "
                                         "the survivor set")
        if not shares_in_field([data for _, _, data in msg.reveals]):
            raise MalformedMessageError(f"invalid share from {sender}: share element "
                                        "outside the field")
        self._keep(self._un_blobs, sender, body, blob)

    def _close_unmask(self) -> dict[int, bytes]:
        cfg, ctx = self.config, self._ctx
        day = self.day
        assert day is not None
        order = self._s_order
        pos = len(self._head) + 12
        # every revealed share as one row (owner ‖ kind ‖ share), grouped by owner, holders
        # ascending within an owner (the responders are taken in ascending order)
        resp = sorted(self._un_blobs)
        r_cnt = np.array([self._in_t[r][0] for r in resp], dtype=np.int64)
        rows = _Rows([self._un_blobs[r] for r in resp], pos, r_cnt, _SHARE_ROW)
        own = rows.u32(rows.pos)
        by = _stable_order(own, cfg.n)
        xs = np.repeat(np.array(resp, dtype=np.int64) + 1, r_cnt)[by]
        counts = np.bincount(own, minlength=cfg.n)[order]
        for i, c in zip(order, counts.tolist(), strict=True):
            if c < cfg.threshold:
                raise SecAggAbortError(f"only {c} shares of client {i}'s self "
                                       f"mask, threshold {cfg.threshold}")
        shares = rows.take(rows.pos[by], SHARE_BYTES, 5)
        try:  # each seed from all its shares: a wrong one among them is detected
            seeds = reconstruct_sorted(xs, counts.tolist(), shares, cfg.threshold,
                                       [self._share_xs[i] for i in order])
        except InconsistentSharesError as exc:
            who = order[exc.item] if exc.item is not None else "?"
            raise ProtocolViolationError(
                f"the shares of client {who}'s self mask are inconsistent: a holder revealed "
                "a wrong share (not attributable)") from exc
        except ShamirError as exc:
            raise ProtocolViolationError(f"self-mask reconstruction failed: {exc}") from exc
        length = cfg.spec.length
        inputs = [self._in_blobs[i] for i in order]  # the vector: the last 8·L bytes
        vec = _Rows(inputs, -MAC_BYTES - 8 * length, np.ones(len(order), dtype=np.int64),
                    8 * length, np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs)))
        raw = vec.take(vec.pos, 8 * length)
        total = raw.view("<i8").sum(0, dtype=np.int64)  # wraps mod 2^64, as the ring requires
        total -= ring_keystreams(ctx.self_mask_keys(seeds, order, day), length).sum(0)
        # i added +mask if i < j, else −mask, for each live neighbour j outside S: undo it
        keyed = [i for i in sorted(self._tag_blobs) if self._out_t[i][0]]
        if keyed:
            k_cnt = np.array([self._out_t[i][0] for i in keyed], dtype=np.int64)
            skip = np.array([self._in_t[i][0] * _TAG_ROW + 4 for i in keyed], dtype=np.int64)
            krows = _Rows([self._tag_blobs[i] for i in keyed], pos, k_cnt, _TAG_ROW, skip)
            j = krows.u32(krows.pos)
            sign = np.where(np.repeat(np.array(keyed, dtype=np.int64), k_cnt) < j, -1, 1)
            kb = krows.take(krows.pos, KEY, 4).tobytes()
            pads = ring_keystreams([kb[a : a + KEY] for a in range(0, len(kb), KEY)], length)
            total += (pads * sign.astype(np.int64)[:, None]).sum(0)
        self.results[day] = self.result = torch.from_numpy(total)
        self.survivors[day] = self._s
        self._clear_day()
        self.stage = EpochServerStage.READY
        return {}
