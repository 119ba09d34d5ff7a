"""Wire primitives shared by the SecAgg+ message schemas (:mod:`protocols.secagg.epoch_messages`):
the HMAC that authenticates every client↔server message after the signed key advertisement,
the server's index, and a strict reader (exact lengths, bounded counts, no duplicate or
out-of-range indices). Parsing errors are :class:`~protocols.secagg.errors.MalformedMessageError`
or its subclass :class:`~protocols.secagg.errors.OversizedMessageError`.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable

from protocols.secagg.errors import (
    MalformedMessageError,
    OversizedMessageError,
    TamperedMessageError,
)

__all__ = ["MAC_BYTES", "SERVER", "add_mac", "strip_mac"]

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


def add_mac(key: bytes, body: bytes) -> bytes:
    """Append an HMAC-SHA256 tag over ``body``."""
    return body + hmac_sha256(key, body, "sha256")


def strip_mac(key: bytes, blob: object, max_bytes: int) -> bytes:
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
    if not hmac.compare_digest(hmac_sha256(key, body, "sha256"), blob[-MAC_BYTES:]):
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
