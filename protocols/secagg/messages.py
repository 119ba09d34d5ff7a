"""Wire primitives shared by the SecAgg+ message schemas (:mod:`protocols.secagg.epoch_messages`):
the HMAC that authenticates every client↔server message after the signed key advertisement,
the server's index, and a strict reader (exact lengths, bounded counts, no duplicate or
out-of-range indices). Parsing errors are :class:`~protocols.secagg.errors.MalformedMessageError`
or its subclass :class:`~protocols.secagg.errors.OversizedMessageError`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable

from protocols.secagg.errors import (
    MalformedMessageError,
    OversizedMessageError,
    TamperedMessageError,
)

__all__ = ["MAC_BYTES", "SERVER", "MacKey", "add_mac", "strip_mac"]

SERVER = 0xFFFFFFFF
MAC_BYTES = 32
_U32 = struct.Struct(">I")


def _openssl_hmac() -> Callable[[bytes, bytes, str], bytes]:
    """OpenSSL's one-shot HMAC, the function ``hmac.digest`` calls for a named digest
    (called directly: the wrapper's checks cost about as much as a short message's MAC);
    ``hmac.digest`` itself where CPython is built without it."""
    try:
        from _hashlib import hmac_digest
    except ImportError:  # pragma: no cover - CPython without OpenSSL
        return hmac.digest
    return hmac_digest  # type: ignore[no-any-return]


hmac_sha256 = _openssl_hmac()
_sha256 = hashlib.sha256
_BLOCK = 64  # SHA-256 block: HMAC pads the key to it
_IPAD, _OPAD = int.from_bytes(b"\x36" * _BLOCK, "big"), int.from_bytes(b"\x5c" * _BLOCK, "big")


def _pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC's (key ⊕ ipad, key ⊕ opad), the key zero-padded to a block (RFC 2104)."""
    if len(key) > _BLOCK:
        key = _sha256(key).digest()
    k = int.from_bytes(key.ljust(_BLOCK, b"\x00"), "big")
    return (k ^ _IPAD).to_bytes(_BLOCK, "big"), (k ^ _OPAD).to_bytes(_BLOCK, "big")


class MacKey:
    """An HMAC-SHA256 key with its two padded-key SHA-256 states hashed once, so each
    message costs its own blocks and two state copies: byte-identical tags to
    ``hmac_sha256(key, body, "sha256")`` (OpenSSL's one-shot HMAC spends ~2 µs a call
    setting up its context, more than hashing a short message), at about half the per-call cost for the
    coordinator's short messages (one MacKey per client, kept for the epoch)."""

    __slots__ = ("_inner", "_outer", "key")

    def __init__(self, key: bytes) -> None:
        if type(key) is not bytes:
            key = bytes(key)
        self.key = key
        i, o = _pads(key)
        self._inner, self._outer = _sha256(i).copy, _sha256(o).copy

    def tag(self, body: bytes) -> bytes:
        """HMAC-SHA256(key, body)."""
        h = self._inner()
        h.update(body)
        o = self._outer()
        o.update(h.digest())
        return o.digest()

    def verify(self, blob: bytes) -> bool:
        """Whether ``blob`` (bytes) ends in the valid tag of the rest (constant-time)."""
        return len(blob) >= MAC_BYTES and hmac.compare_digest(self.tag(blob[:-MAC_BYTES]),
                                                               blob[-MAC_BYTES:])


def add_mac(key: bytes | MacKey, body: bytes) -> bytes:
    """Append an HMAC-SHA256 tag over ``body``."""
    if type(key) is MacKey:
        return body + key.tag(body)
    return body + hmac_sha256(key, body, "sha256")  # type: ignore[arg-type]


def strip_mac(key: bytes | MacKey, blob: object, max_bytes: int) -> bytes:
    """Check size and HMAC of ``blob``; return the body. Raises
    :class:`OversizedMessageError`, :class:`MalformedMessageError` or
    :class:`TamperedMessageError`."""
    if type(blob) is not bytes:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise MalformedMessageError(f"message must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
    size = len(blob)
    if size > max_bytes + MAC_BYTES:
        raise OversizedMessageError(f"message of {size} bytes exceeds {max_bytes}")
    if size < MAC_BYTES:
        raise MalformedMessageError("message shorter than its MAC")
    body = blob[:-MAC_BYTES]
    mac = key.tag(body) if type(key) is MacKey else hmac_sha256(key, body, "sha256")  # type: ignore[union-attr, arg-type]
    if not hmac.compare_digest(mac, blob[-MAC_BYTES:]):
        raise TamperedMessageError("message MAC does not verify")
    return body


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


def _index(value: int, n: int) -> int:
    if value >= n:
        raise MalformedMessageError(f"client index {value} out of range (n={n})")
    return value


def _count(r: _Reader, limit: int) -> int:
    c = r.u32()
    if c > limit:
        raise OversizedMessageError(f"{c} entries exceed the limit {limit}")
    return c


def _no_duplicates(indices: object) -> None:
    seen: set[int] = set()
    for i in indices:  # type: ignore[attr-defined]
        if i in seen:
            raise MalformedMessageError(f"duplicate index {i}")
        seen.add(i)
