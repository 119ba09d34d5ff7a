"""Wire schemas of SecAgg+: strict binary encodings with exact lengths and size limits.

Every message starts with a header ``MAGIC ‖ type ‖ run_id ‖ round ‖ sender ‖ receiver``
(indices into the round's roster; :data:`SERVER` is the server). Parsing rejects wrong magic
or type, truncation, trailing bytes, out-of-range or duplicate indices and oversized inputs
with :class:`~protocols.secagg.errors.MalformedMessageError` (or its subclass
:class:`~protocols.secagg.errors.OversizedMessageError`); the state machines then check the
header against their own context.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from protocols.envelope import NONCE_BYTES, TAG_BYTES
from protocols.secagg.errors import (
    MalformedMessageError,
    OversizedMessageError,
    TamperedMessageError,
)
from protocols.secagg.shamir import SHARE_BYTES

__all__ = [
    "SERVER",
    "Advertise",
    "Delivery",
    "Header",
    "MaskedInput",
    "MsgType",
    "Roster",
    "ShareBundle",
    "ShareKind",
    "SharePayload",
    "Step",
    "UnmaskRequest",
    "UnmaskResponse",
    "add_mac",
    "parse_header",
    "strip_mac",
]

MAGIC = b"SAG1"
SERVER = 0xFFFFFFFF
KEY = 32
SIG = 64
SHARE_PAYLOAD_BYTES = 8 + 2 * SHARE_BYTES
ENVELOPE_BYTES = NONCE_BYTES + SHARE_PAYLOAD_BYTES + TAG_BYTES
MAX_MESSAGE_BYTES = (1 << 29) + 1024  # above the largest masked vector InputSpec allows
_U32 = struct.Struct(">I")
MAC_BYTES = 32


def add_mac(key: bytes, body: bytes) -> bytes:
    """Append an HMAC-SHA256 tag over ``body``."""
    return body + hmac.new(key, body, hashlib.sha256).digest()


def strip_mac(key: bytes, blob: object, max_bytes: int) -> bytes:
    """Check size and HMAC of ``blob``; return the body. Raises
    :class:`OversizedMessageError`, :class:`MalformedMessageError` or
    :class:`TamperedMessageError`."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"message must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > max_bytes + MAC_BYTES:
        raise OversizedMessageError(f"message of {len(blob)} bytes exceeds {max_bytes}")
    if len(blob) < MAC_BYTES:
        raise MalformedMessageError("message shorter than its MAC")
    body, tag = blob[:-MAC_BYTES], blob[-MAC_BYTES:]
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
        raise TamperedMessageError("message MAC does not verify")
    return body


class Step(IntEnum):
    """Protocol stages; also the ``step`` of every key-derivation and envelope context."""

    ADVERTISE = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3


class MsgType(IntEnum):
    ADVERTISE = 1
    ROSTER = 2
    SHARES = 3
    DELIVERY = 4
    MASKED = 5
    UNMASK_REQUEST = 6
    UNMASK_RESPONSE = 7


class ShareKind(IntEnum):
    SELF_MASK = 0  # share of the self-mask seed b_i (revealed for survivors)
    MASK_KEY = 1  # share of the mask-agreement private key (revealed for dropped peers)


@dataclass(frozen=True)
class Header:
    type: MsgType
    run_id: str
    round: int
    sender: int
    receiver: int

    def encode(self) -> bytes:
        run = self.run_id.encode()
        if len(run) > 255:
            raise ValueError("run_id too long")
        return (
            MAGIC
            + bytes([int(self.type), len(run)])
            + run
            + struct.pack(">QII", self.round, self.sender, self.receiver)
        )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedMessageError("message truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MalformedMessageError(f"{len(self.data) - self.pos} trailing bytes")


def _start(blob: object, expected: MsgType, max_bytes: int) -> tuple[Header, _Reader]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"message must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > max_bytes:
        raise OversizedMessageError(f"message of {len(blob)} bytes exceeds {max_bytes}")
    header, r = _parse_header(blob)
    if header.type != expected:
        raise MalformedMessageError(f"expected a {expected.name} message, got {header.type.name}")
    return header, r


def _parse_header(blob: bytes) -> tuple[Header, _Reader]:
    r = _Reader(blob)
    if r.take(4) != MAGIC:
        raise MalformedMessageError("bad magic")
    t = r.take(1)[0]
    try:
        mtype = MsgType(t)
    except ValueError as exc:
        raise MalformedMessageError(f"unknown message type {t}") from exc
    run_len = r.take(1)[0]
    try:
        run = r.take(run_len).decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessageError("run_id is not UTF-8") from exc
    rnd, sender, receiver = struct.unpack(">QII", r.take(16))
    if rnd >= 2**63:
        raise MalformedMessageError("round out of range")
    return Header(mtype, run, rnd, sender, receiver), r


def parse_header(blob: bytes) -> Header:
    """The header of any SecAgg message (for transports that route on it)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessageError("message must be bytes")
    return _parse_header(bytes(blob))[0]


def _index(value: int, n: int) -> int:
    if value >= n:
        raise MalformedMessageError(f"client index {value} out of range (n={n})")
    return value


def _count(r: _Reader, limit: int) -> int:
    c = r.u32()
    if c > limit:
        raise OversizedMessageError(f"{c} entries exceed the limit {limit}")
    return c


@dataclass(frozen=True)
class Advertise:
    """Client → server: the round's two X25519 public keys, signed by the identity key."""

    header: Header
    c_pk: bytes  # channel key (encrypts shares)
    s_pk: bytes  # mask key (pairwise masks)
    signature: bytes

    def encode(self) -> bytes:
        return self.header.encode() + self.c_pk + self.s_pk + self.signature

    @classmethod
    def decode(cls, blob: bytes, n: int) -> Advertise:
        header, r = _start(blob, MsgType.ADVERTISE, 64 + 2 * KEY + SIG + 255)
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
class Roster:
    """Server → client: the signed key advertisements of the client's live neighbours."""

    header: Header
    entries: tuple[RosterEntry, ...]

    def encode(self) -> bytes:
        parts = [self.header.encode(), _U32.pack(len(self.entries))]
        for e in self.entries:
            parts += [_U32.pack(e.index), e.c_pk, e.s_pk, e.signature]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes, n: int, max_entries: int) -> Roster:
        size = 300 + max_entries * (4 + 2 * KEY + SIG)
        header, r = _start(blob, MsgType.ROSTER, size)
        entries = []
        for _ in range(_count(r, max_entries)):
            idx = _index(r.u32(), n)
            entries.append(RosterEntry(idx, r.take(KEY), r.take(KEY), r.take(SIG)))
        r.end()
        _no_duplicates(e.index for e in entries)
        return cls(header, tuple(entries))


def _no_duplicates(indices: object) -> None:
    seen: set[int] = set()
    for i in indices:  # type: ignore[attr-defined]
        if i in seen:
            raise MalformedMessageError(f"duplicate index {i}")
        seen.add(i)


@dataclass(frozen=True)
class _Envelopes:
    header: Header
    envelopes: tuple[tuple[int, bytes], ...]  # (peer index, sealed envelope)

    _TYPE = MsgType.SHARES

    def encode(self) -> bytes:
        parts = [self.header.encode(), _U32.pack(len(self.envelopes))]
        for idx, env in self.envelopes:
            if len(env) != ENVELOPE_BYTES:
                raise ValueError("envelope of the wrong size")
            parts += [_U32.pack(idx), env]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes, n: int, max_entries: int):  # type: ignore[no-untyped-def]
        size = 300 + max_entries * (4 + ENVELOPE_BYTES)
        header, r = _start(blob, cls._TYPE, size)
        envs = []
        for _ in range(_count(r, max_entries)):
            idx = _index(r.u32(), n)
            envs.append((idx, r.take(ENVELOPE_BYTES)))
        r.end()
        _no_duplicates(i for i, _ in envs)
        return cls(header, tuple(envs))


@dataclass(frozen=True)
class ShareBundle(_Envelopes):
    """Client → server: one sealed share envelope per live neighbour (index = receiver)."""

    _TYPE = MsgType.SHARES


@dataclass(frozen=True)
class Delivery(_Envelopes):
    """Server → client: the envelopes addressed to the client (index = sender)."""

    _TYPE = MsgType.DELIVERY


@dataclass(frozen=True)
class SharePayload:
    """Plaintext of a share envelope: the sender's two shares for one receiver."""

    sender: int
    receiver: int
    self_mask_share: bytes
    mask_key_share: bytes

    def encode(self) -> bytes:
        return (
            struct.pack(">II", self.sender, self.receiver)
            + self.self_mask_share
            + self.mask_key_share
        )

    @classmethod
    def decode(cls, data: bytes) -> SharePayload:
        if len(data) != SHARE_PAYLOAD_BYTES:
            raise MalformedMessageError("share payload of the wrong size")
        s, rcv = struct.unpack(">II", data[:8])
        return cls(s, rcv, data[8 : 8 + SHARE_BYTES], data[8 + SHARE_BYTES :])


@dataclass(frozen=True)
class MaskedInput:
    """Client → server: the masked input vector (int64, little-endian)."""

    header: Header
    vector: torch.Tensor

    def encode(self) -> bytes:
        arr = self.vector.numpy().astype("<i8", copy=False)
        return self.header.encode() + _U32.pack(arr.size) + arr.tobytes()

    @classmethod
    def decode(cls, blob: bytes, n: int, length: int) -> MaskedInput:
        header, r = _start(blob, MsgType.MASKED, 300 + 8 * length)
        if r.u32() != length:
            raise MalformedMessageError(f"masked vector length differs from {length}")
        raw = r.take(8 * length)
        r.end()
        _index(header.sender, n)
        vec = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
        return cls(header, vec)


def _index_list(r: _Reader, n: int, limit: int) -> tuple[int, ...]:
    vals = tuple(_index(r.u32(), n) for _ in range(_count(r, limit)))
    if any(b <= a for a, b in zip(vals, vals[1:], strict=False)):
        raise MalformedMessageError("index list must be strictly increasing")
    return vals


@dataclass(frozen=True)
class UnmaskRequest:
    """Server → client: which of the client's neighbours survived (reveal the self-mask
    share) and which dropped (reveal the mask-key share), plus the number of survivors."""

    header: Header
    n_survivors: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def encode(self) -> bytes:
        parts = [self.header.encode(), _U32.pack(self.n_survivors)]
        for lst in (self.survivors, self.dropped):
            parts.append(_U32.pack(len(lst)))
            parts += [_U32.pack(i) for i in lst]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes, n: int, max_entries: int) -> UnmaskRequest:
        header, r = _start(blob, MsgType.UNMASK_REQUEST, 300 + 8 * (max_entries + 2))
        n_surv = r.u32()
        if n_surv > n:
            raise MalformedMessageError("more survivors than clients")
        surv = _index_list(r, n, max_entries)
        drop = _index_list(r, n, max_entries)
        r.end()
        return cls(header, n_surv, surv, drop)


@dataclass(frozen=True)
class UnmaskResponse:
    """Client → server: one share per neighbour named in the request."""

    header: Header
    shares: tuple[tuple[int, ShareKind, bytes], ...]

    def encode(self) -> bytes:
        parts = [self.header.encode(), _U32.pack(len(self.shares))]
        for idx, kind, sh in self.shares:
            parts += [_U32.pack(idx), bytes([int(kind)]), sh]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes, n: int, max_entries: int) -> UnmaskResponse:
        header, r = _start(blob, MsgType.UNMASK_RESPONSE, 300 + max_entries * (5 + SHARE_BYTES))
        out = []
        for _ in range(_count(r, max_entries)):
            idx = _index(r.u32(), n)
            k = r.take(1)[0]
            try:
                kind = ShareKind(k)
            except ValueError as exc:
                raise MalformedMessageError(f"unknown share kind {k}") from exc
            out.append((idx, kind, r.take(SHARE_BYTES)))
        r.end()
        _no_duplicates(i for i, _, _ in out)
        return cls(header, tuple(out))
