"""Shamir t-of-k secret sharing of 32-byte secrets over GF(p), p = 2^127 − 1.

A secret is split into 15-byte chunks (each < p); every chunk gets its own random
polynomial of degree t − 1 with coefficients from the OS CSPRNG. A share is the vector of
chunk evaluations at the holder's x-coordinate. Reconstruction interpolates at 0 with
Lagrange coefficients cached per set of x-coordinates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

__all__ = [
    "CHUNKS",
    "PRIME",
    "SHARE_BYTES",
    "ShamirError",
    "reconstruct_secret",
    "share_secret",
]

PRIME = (1 << 127) - 1
SECRET_BYTES = 32
_CHUNK = 15
CHUNKS = -(-SECRET_BYTES // _CHUNK)  # 3
ELEMENT_BYTES = 16
SHARE_BYTES = CHUNKS * ELEMENT_BYTES  # 48
_OFFSETS = tuple(range(0, SHARE_BYTES, ELEMENT_BYTES))


class ShamirError(ValueError):
    """Bad threshold, duplicate or invalid x-coordinates, or too few shares."""


def _random_element() -> int:
    while True:
        v = int.from_bytes(os.urandom(ELEMENT_BYTES), "big") & PRIME
        if v != PRIME:
            return v


def _chunks(secret: bytes) -> list[int]:
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes")
    return [int.from_bytes(secret[i : i + _CHUNK], "big") for i in range(0, SECRET_BYTES, _CHUNK)]


def _unchunk(values: Sequence[int]) -> bytes:
    out = b""
    for i, v in enumerate(values):
        width = min(_CHUNK, SECRET_BYTES - i * _CHUNK)
        if v >= 1 << (8 * width):
            raise ShamirError("reconstructed value is not a valid secret chunk")
        out += v.to_bytes(width, "big")
    return out


def encode_share(values: Sequence[int]) -> bytes:
    """Serialise one share (CHUNKS field elements) to SHARE_BYTES bytes."""
    return b"".join(v.to_bytes(ELEMENT_BYTES, "big") for v in values)


def decode_share(data: bytes) -> tuple[int, ...]:
    """Parse SHARE_BYTES bytes into field elements; raises :class:`ShamirError` if invalid."""
    if len(data) != SHARE_BYTES:
        raise ShamirError(f"share must be {SHARE_BYTES} bytes")
    vals = tuple([int.from_bytes(data[i : i + ELEMENT_BYTES], "big") for i in _OFFSETS])
    if max(vals) >= PRIME:
        raise ShamirError("share element outside the field")
    return vals


def share_secret(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Shares of ``secret`` for holders at distinct nonzero ``xs``; any ``threshold`` of
    them reconstruct it, fewer reveal nothing."""
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} not in [1, {len(xs)}]")
    _check_xs(xs)
    polys = [[c] + [_random_element() for _ in range(threshold - 1)] for c in _chunks(secret)]
    shares = []
    for x in xs:
        vals = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):
                acc = (acc * x + c) % PRIME
            vals.append(acc)
        shares.append(encode_share(vals))
    return shares


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ShamirError("x-coordinates must be distinct")
    if any(not isinstance(x, int) or not 0 < x < PRIME for x in xs):
        raise ShamirError("x-coordinates must be integers in (0, p)")


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    coeffs = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(coeffs)


def reconstruct_secret(shares: dict[int, bytes], threshold: int) -> bytes:
    """Reconstruct a secret from ``{x: share}`` with at least ``threshold`` entries (the
    ``threshold`` smallest x are used)."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, need {threshold}")
    xs = tuple(sorted(shares)[:threshold])
    _check_xs(xs)
    lam = _lagrange_at_zero(xs)
    vals = [decode_share(shares[x]) for x in xs]
    out = []
    for c in range(CHUNKS):
        acc = 0
        for lj, v in zip(lam, vals, strict=True):
            acc += lj * v[c]
        out.append(acc % PRIME)
    return _unchunk(out)
