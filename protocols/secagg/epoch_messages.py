"""Wire schemas of multi-round SecAgg+ (one key epoch, many days).

Every message starts with ``SAG2 ‖ type ‖ run_id ‖ epoch ‖ day ‖ sender ‖ receiver``
(indices into the epoch's roster; :data:`SERVER` is the server; setup messages carry day 0).
Parsing is strict (exact lengths, bounded counts, no duplicate or out-of-range indices, no
trailing bytes) and raises only :class:`~protocols.secagg.errors.MalformedMessageError` or
its subclass :class:`~protocols.secagg.errors.OversizedMessageError`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from protocols.envelope import NONCE_BYTES, TAG_BYTES
from protocols.secagg.errors import MalformedMessageError, OversizedMessageError
from protocols.secagg.messages import SERVER, _count, _index, _no_duplicates, _Reader
from protocols.secagg.shamir import SHARE_BYTES

__all__ = [
    "EHeader",
    "EMsg",
    "EpochAdvertise",
    "EpochRoster",
    "DayInput",
    "RevealKind",
    "SERVER",
    "SharePayload",
    "SurvivorSet",
    "SurvivorTags",
    "DayUnmaskRequest",
    "DayUnmaskResponse",
    "pack_indexed",
    "parse_eheader",
    "reveals_ok",
]

MAGIC = b"SAG2"
KEY = 32
SIG = 64
TAG = 32
SHARE_PAYLOAD_BYTES = 8 + SHARE_BYTES
ENVELOPE_BYTES = NONCE_BYTES + SHARE_PAYLOAD_BYTES + TAG_BYTES
HEADER_MAX = 4 + 2 + 255 + 24
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">QQII")


class EMsg(IntEnum):
    ADVERTISE = 1
    ROSTER = 2
    INPUT = 3
    SURVIVORS = 4
    TAGS = 5
    UNMASK_REQUEST = 6
    UNMASK_RESPONSE = 7


class RevealKind(IntEnum):
    """What an unmask response reveals per neighbour. Only self-mask shares: the day keys
    with neighbours outside the survivor set travel with the consistency tags
    (:class:`SurvivorTags`), so a survivor that dies after tagging leaves none missing."""

    SELF_MASK_SHARE = 0  # share of a surviving neighbour's self-mask seed b_{j,d}


_REVEAL_BYTES = {RevealKind.SELF_MASK_SHARE: SHARE_BYTES}


@dataclass(frozen=True)
class EHeader:
    type: EMsg
    run_id: str
    epoch: int
    day: int
    sender: int
    receiver: int

    def encode(self) -> bytes:
        run = self.run_id.encode()
        if not 1 <= len(run) <= 255:
            raise MalformedMessageError("run_id must be 1..255 bytes")
        return (MAGIC + bytes([int(self.type), len(run)]) + run
                + _HEAD.pack(self.epoch, self.day, self.sender, self.receiver))


_EMSG = {int(m): m for m in EMsg}
_KINDS = {int(k): k for k in RevealKind}


def _parse(blob: bytes) -> tuple[EHeader, _Reader]:
    if len(blob) < 6 + _HEAD.size or blob[:4] != MAGIC:
        if len(blob) >= 4 and blob[:4] != MAGIC:
            raise MalformedMessageError("bad magic")
        raise MalformedMessageError("message truncated")
    mtype = _EMSG.get(blob[4])
    if mtype is None:
        raise MalformedMessageError(f"unknown message type {blob[4]}")
    run_len = blob[5]
    end = 6 + run_len
    if len(blob) < end + _HEAD.size:
        raise MalformedMessageError("message truncated")
    try:
        run = blob[6:end].decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessageError("run_id is not UTF-8") from exc
    epoch, day, sender, receiver = _HEAD.unpack_from(blob, end)
    if epoch >= 2**63 or day >= 2**63:
        raise MalformedMessageError("epoch or day out of range")
    r = _Reader(blob)
    r.pos = end + _HEAD.size
    return EHeader(mtype, run, epoch, day, sender, receiver), r


def _start(blob: object, expected: EMsg, max_bytes: int) -> tuple[EHeader, _Reader]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"message must be bytes, got {type(blob).__name__}")
    if type(blob) is not bytes:
        blob = bytes(blob)
    if len(blob) > max_bytes:
        raise OversizedMessageError(f"message of {len(blob)} bytes exceeds {max_bytes}")
    header, r = _parse(blob)
    if header.type != expected:
        raise MalformedMessageError(f"expected a {expected.name} message, got {header.type.name}")
    return header, r


def parse_eheader(blob: object) -> EHeader:
    """The header of any multi-round SecAgg message (for transports that route on it)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError("message must be bytes")
    return _parse(bytes(blob))[0]


@dataclass(frozen=True)
class EpochAdvertise:
    """Client → server (setup): channel and mask X25519 keys, signed by the identity key."""

    header: EHeader
    c_pk: bytes
    s_pk: bytes
    signature: bytes

    def encode(self) -> bytes:
        return self.header.encode() + self.c_pk + self.s_pk + self.signature

    @classmethod
    def decode(cls, blob: object, n: int) -> EpochAdvertise:
        header, r = _start(blob, EMsg.ADVERTISE, HEADER_MAX + 2 * KEY + SIG)
        c_pk, s_pk, sig = r.take(KEY), r.take(KEY), r.take(SIG)
        r.end()
        _index(header.sender, n)
        return cls(header, c_pk, s_pk, sig)


@dataclass(frozen=True)
class RosterEntry:
    index: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes


@dataclass(frozen=True)
class EpochRoster:
    """Server → client (setup): the signed advertisements of the client's live neighbours."""

    header: EHeader
    entries: tuple[RosterEntry, ...]

    def encode(self) -> bytes:
        parts = [self.header.encode(), _U32.pack(len(self.entries))]
        for e in self.entries:
            parts += [_U32.pack(e.index), e.c_pk, e.s_pk, e.signature]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: object, n: int, max_entries: int) -> EpochRoster:
        header, r = _start(blob, EMsg.ROSTER, HEADER_MAX + 4 + max_entries * (4 + 2 * KEY + SIG))
        entries = []
        for _ in range(_count(r, max_entries)):
            idx = _index(r.u32(), n)
            entries.append(RosterEntry(idx, r.take(KEY), r.take(KEY), r.take(SIG)))
        r.end()
        _no_duplicates(e.index for e in entries)
        return cls(header, tuple(entries))


def _indexed(r: _Reader, n: int, limit: int, size: int) -> tuple[tuple[int, bytes], ...]:
    """``count ‖ (u32 index ‖ size bytes)*``: indices < n, distinct (one struct pass)."""
    count = _count(r, limit)
    out = tuple(struct.iter_unpack(f">I{size}s", r.take(count * (4 + size))))
    if count:
        idx = [i for i, _ in out]
        if max(idx) >= n:
            raise MalformedMessageError(f"client index {max(idx)} out of range (n={n})")
        if len(set(idx)) != count:
            raise MalformedMessageError("duplicate index")
    return out


def _envelopes(r: _Reader, n: int, limit: int) -> tuple[tuple[int, bytes], ...]:
    return _indexed(r, n, limit, ENVELOPE_BYTES)


def pack_indexed(entries: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]],
                 size: int, what: str) -> bytes:
    """``count ‖ (u32 index ‖ size bytes)*`` (the inverse of the parsers' indexed lists)."""
    if any(len(v) != size for _, v in entries):
        raise MalformedMessageError(f"{what} of the wrong size")
    return b"".join([_U32.pack(len(entries)), *(_U32.pack(i) + v for i, v in entries)])


def _pack_envelopes(envs: tuple[tuple[int, bytes], ...]) -> list[bytes]:
    return [pack_indexed(envs, ENVELOPE_BYTES, "envelope")]


@dataclass(frozen=True)
class DayInput:
    """Client → server (day, 1/3): sealed self-mask shares (index = receiver) and the masked
    vector y = x + PRG(b) + Σ ±PRG(day pairwise keys), int64 little-endian."""

    header: EHeader
    envelopes: tuple[tuple[int, bytes], ...]
    vector: torch.Tensor

    def encode(self) -> bytes:
        arr = self.vector.numpy().astype("<i8", copy=False)
        return b"".join([self.header.encode(), *_pack_envelopes(self.envelopes),
                         _U32.pack(arr.size), arr.tobytes()])

    @classmethod
    def decode(cls, blob: object, n: int, max_entries: int, length: int) -> DayInput:
        size = HEADER_MAX + 8 + max_entries * (4 + ENVELOPE_BYTES) + 8 * length
        header, r = _start(blob, EMsg.INPUT, size)
        envs = _envelopes(r, n, max_entries)
        if r.u32() != length:
            raise MalformedMessageError(f"masked vector length differs from {length}")
        raw = r.take(8 * length)
        r.end()
        _index(header.sender, n)
        vec = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
        return cls(header, envs, vec)


def encode_bitmap(members: frozenset[int] | set[int], n: int) -> bytes:
    """Roster-indexed membership bitmap (bit i of byte i // 8, LSB first)."""
    bits = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    bits[sorted(members)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def decode_bitmap(data: bytes, n: int) -> frozenset[int]:
    """Inverse of :func:`encode_bitmap`; padding bits must be zero."""
    if len(data) != -(-n // 8):
        raise MalformedMessageError("survivor bitmap of the wrong size")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise MalformedMessageError("survivor bitmap names clients outside the roster")
    return frozenset(np.flatnonzero(bits).tolist())


@dataclass(frozen=True)
class SurvivorSet:
    """Server → client (day, 2/3): the day's survivor set S, to be signed."""

    header: EHeader
    bitmap: bytes

    def encode(self) -> bytes:
        return self.header.encode() + _U32.pack(len(self.bitmap)) + self.bitmap

    @classmethod
    def decode(cls, blob: object, n: int) -> tuple[SurvivorSet, frozenset[int]]:
        header, r = _start(blob, EMsg.SURVIVORS, HEADER_MAX + 4 + -(-n // 8))
        size = r.u32()
        bitmap = r.take(size)
        r.end()
        return cls(header, bitmap), decode_bitmap(bitmap, n)


def _pack_tags(tags: tuple[tuple[int, bytes], ...]) -> list[bytes]:
    return [pack_indexed(tags, TAG, "tag")]


def _tags(r: _Reader, n: int, limit: int) -> tuple[tuple[int, bytes], ...]:
    return _indexed(r, n, limit, TAG)


@dataclass(frozen=True)
class SurvivorTags:
    """Client → server (day, 2/3): per live neighbour in the survivor set S (index =
    receiver), HMAC-SHA256 under the pair's consistency key over (run, epoch, day, S,
    signer, receiver); and per live neighbour *outside* S (index = that neighbour), the
    day's pairwise mask key with it (what the server needs to remove that mask from the
    sender's input, revealed now so that the sender may die before unmasking)."""

    header: EHeader
    tags: tuple[tuple[int, bytes], ...]
    day_keys: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        if any(len(k) != KEY for _, k in self.day_keys):
            raise MalformedMessageError("day key of the wrong size")
        return b"".join([self.header.encode(), *_pack_tags(self.tags),
                         *_pack_tags(self.day_keys)])

    @classmethod
    def decode(cls, blob: object, n: int, max_entries: int) -> SurvivorTags:
        size = HEADER_MAX + 8 + max_entries * (8 + TAG + KEY)
        header, r = _start(blob, EMsg.TAGS, size)
        tags = _tags(r, n, max_entries)
        day_keys = _indexed(r, n, max_entries, KEY)
        r.end()
        _index(header.sender, n)
        if {i for i, _ in tags} & {i for i, _ in day_keys}:
            raise MalformedMessageError("a neighbour is both in and outside the survivor set")
        return cls(header, tags, day_keys)


@dataclass(frozen=True)
class DayUnmaskRequest:
    """Server → client (day, 3/3): its neighbours' consistency tags addressed to it (index =
    signer) and the sealed self-mask shares addressed to it (index = sender)."""

    header: EHeader
    tags: tuple[tuple[int, bytes], ...]
    envelopes: tuple[tuple[int, bytes], ...]

    def encode(self) -> bytes:
        return b"".join([self.header.encode(), *_pack_tags(self.tags),
                         *_pack_envelopes(self.envelopes)])

    @classmethod
    def decode(cls, blob: object, n: int, max_entries: int) -> DayUnmaskRequest:
        size = HEADER_MAX + 8 + max_entries * (8 + TAG + ENVELOPE_BYTES)
        header, r = _start(blob, EMsg.UNMASK_REQUEST, size)
        tags = _tags(r, n, max_entries)
        envs = _envelopes(r, n, max_entries)
        r.end()
        return cls(header, tags, envs)


@dataclass(frozen=True)
class DayUnmaskResponse:
    """Client → server (day, 3/3): per live neighbour in S, its share of that neighbour's
    self-mask seed."""

    header: EHeader
    reveals: tuple[tuple[int, RevealKind, bytes], ...]

    def encode(self) -> bytes:
        parts = [self.header.encode(), _U32.pack(len(self.reveals))]
        for idx, kind, data in self.reveals:
            if len(data) != _REVEAL_BYTES[kind]:
                raise MalformedMessageError("reveal of the wrong size")
            parts += [_U32.pack(idx), bytes([int(kind)]), data]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: object, n: int, max_entries: int) -> DayUnmaskResponse:
        size = HEADER_MAX + 4 + max_entries * (5 + SHARE_BYTES)
        header, r = _start(blob, EMsg.UNMASK_RESPONSE, size)
        count = _count(r, max_entries)
        rows = list(struct.iter_unpack(f">IB{SHARE_BYTES}s", r.take(count * (5 + SHARE_BYTES))))
        r.end()
        _index(header.sender, n)
        if count:
            idx = [i for i, _, _ in rows]
            if max(idx) >= n:
                raise MalformedMessageError(f"client index {max(idx)} out of range (n={n})")
            if len(set(idx)) != count:
                raise MalformedMessageError("duplicate index")
        out = []
        for idx_, k, data in rows:
            kind = _KINDS.get(k)
            if kind is None:
                raise MalformedMessageError(f"unknown reveal kind {k}")
            out.append((idx_, kind, data))
        return cls(header, tuple(out))


@dataclass(frozen=True)
class SharePayload:
    """Plaintext of a self-mask share envelope."""

    sender: int
    receiver: int
    share: bytes

    def encode(self) -> bytes:
        return struct.pack(">II", self.sender, self.receiver) + self.share

    @classmethod
    def decode(cls, data: bytes) -> SharePayload:
        if len(data) != SHARE_PAYLOAD_BYTES:
            raise MalformedMessageError("share payload of the wrong size")
        s, rcv = struct.unpack(">II", data[:8])
        return cls(s, rcv, data[8:])


# -- exact-layout parsers (the benchmark's fast plain coordinator; the epoch server now checks
# the exact layout with one struct read of the whole message and otherwise runs the strict
# decoder) ---------------------------------------------------------------------------------
# Each takes a MAC-stripped body and the exact header bytes the receiver expects, and returns
# the parsed fields only if the body is *exactly* well formed with that header (right type,
# run, epoch, day, sender and receiver; counts and sizes consistent; no duplicate index; no
# trailing bytes); otherwise None, and the caller runs the strict decoder above, which raises
# the precise error. A header that passes the strict checks encodes to exactly these bytes
# (fixed-width integers, strict UTF-8), so the two paths accept the same messages.

_ROW_ENV = struct.Struct(f">I{ENVELOPE_BYTES}s")
_ROW_KEY = struct.Struct(f">I{KEY}s")
_ROW_SHARE = struct.Struct(f">I1x{SHARE_BYTES}s")
# one unmask reveal: u32 index, kind 0 (SELF_MASK_SHARE), three field elements < 2^127 − 1
_ELEMENT = rb"(?:[\x00-\x7e][\x00-\xff]{15}|\x7f(?!\xff{15})[\x00-\xff]{15})"
_REVEALS = re.compile(rb"(?:[\x00-\xff]{4}\x00" + _ELEMENT + rb"{3})*")


def header_prefix(mtype: EMsg, run_id: str, epoch: int, day: int) -> bytes:
    """The header bytes up to (not including) sender and receiver."""
    return EHeader(mtype, run_id, epoch, day, 0, 0).encode()[: -8]


def _rows(body: bytes, pos: int, row: struct.Struct, limit: int
          ) -> tuple[dict[int, bytes], int] | None:
    if len(body) < pos + 4:
        return None
    (count,) = _U32.unpack_from(body, pos)
    end = pos + 4 + count * row.size
    if count > limit or len(body) < end:
        return None
    out = dict(row.iter_unpack(body[pos + 4 : end]))
    return (out, end) if len(out) == count else None


def fast_input(body: bytes, head: bytes, limit: int, length: int
               ) -> tuple[dict[int, bytes], bytes] | None:
    """DayInput body → ({receiver: envelope}, masked vector as int64 little-endian bytes)."""
    if not body.startswith(head):
        return None
    got = _rows(body, len(head), _ROW_ENV, limit)
    if got is None:
        return None
    envs, pos = got
    if len(body) != pos + 4 + 8 * length or _U32.unpack_from(body, pos)[0] != length:
        return None
    return envs, body[pos + 4 :]


def fast_tags(body: bytes, head: bytes, limit: int
              ) -> tuple[dict[int, bytes], dict[int, bytes]] | None:
    """SurvivorTags body → ({receiver: tag}, {dropped neighbour: day key})."""
    if not body.startswith(head):
        return None
    got = _rows(body, len(head), _ROW_KEY, limit)
    if got is None:
        return None
    tags, pos = got
    got = _rows(body, pos, _ROW_KEY, limit)
    if got is None or got[1] != len(body) or tags.keys() & got[0].keys():
        return None
    return tags, got[0]


def fast_reveals(body: bytes, head: bytes, limit: int) -> dict[int, bytes] | None:
    """DayUnmaskResponse body of self-mask shares, every element in the field →
    {owner: share}."""
    pos = len(head)
    if not body.startswith(head) or len(body) < pos + 4:
        return None
    (count,) = _U32.unpack_from(body, pos)
    region = body[pos + 4 :]
    if count > limit or len(region) != count * _ROW_SHARE.size or not _REVEALS.fullmatch(region):
        return None
    out = dict(_ROW_SHARE.iter_unpack(region))
    return out if len(out) == count else None


_REVEAL_ROW = 5 + SHARE_BYTES
_PRIME_BYTES = b"\x7f" + b"\xff" * 15  # 2^127 − 1, the smallest element outside the field


def reveals_ok(blob: bytes, pos: int, count: int) -> bool:
    """Every reveal row of ``blob[pos:]`` (u32 owner ‖ kind ‖ three 16-byte big-endian
    elements) has kind 0 (SELF_MASK_SHARE) and elements < 2^127 − 1. Common case: every
    element's top byte < 0x7f (three strided slices); a top byte 0x7f is below 2^127 − 1
    unless the element is exactly 0x7f ff…ff, which then occurs in the rows as a substring
    (if it does anywhere, the exact pattern decides). The caller has checked that ``blob``
    holds all ``count`` rows."""
    end = pos + count * _REVEAL_ROW
    if blob[pos + 4 : end : _REVEAL_ROW] != bytes(count):
        return False
    tops = (blob[pos + 5 : end : _REVEAL_ROW] + blob[pos + 21 : end : _REVEAL_ROW]
            + blob[pos + 37 : end : _REVEAL_ROW])
    top = max(tops, default=0)
    if top != 0x7F:
        return top < 0x7F
    return blob.find(_PRIME_BYTES, pos, end) < 0 or _REVEALS.fullmatch(blob, pos, end) is not None
