"""Shamir t-of-k secret sharing of 32-byte secrets over GF(p), p = 2^127 − 1.

A secret is split into 15-byte chunks (each < p); every chunk gets its own random
polynomial of degree t − 1 with coefficients from the OS CSPRNG. A share is the vector of
chunk evaluations at the holder's x-coordinate. Reconstruction interpolates at 0 with
Lagrange coefficients cached per set of x-coordinates.

:func:`reconstruct_secrets` is the coordinator's batched path: many secrets at once, each
from all the shares it received, interpolated once from the ``threshold`` smallest
x-coordinates, and every further share checked against that polynomial (a wrong share
among more than ``threshold`` is always detected). The three chunks of a share travel as
one Python integer with 2^(8·lane) spacing, so each Lagrange term is one multiplication.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from operator import mul

import numpy as np

__all__ = [
    "CHUNKS",
    "PRIME",
    "SHARE_BYTES",
    "InconsistentSharesError",
    "ShamirError",
    "reconstruct_secret",
    "reconstruct_secrets",
    "shares_in_field",
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
    """Bad threshold, duplicate or invalid x-coordinates, or too few shares. ``item`` is the
    position of the failing secret in a :func:`reconstruct_secrets` batch (else None)."""

    def __init__(self, message: str, item: int | None = None) -> None:
        super().__init__(message)
        self.item = item


class InconsistentSharesError(ShamirError):
    """The shares of one secret do not all lie on one polynomial of degree < threshold
    (a holder revealed a wrong share)."""


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


def _inverses(values: Sequence[int]) -> list[int]:
    """Modular inverses of nonzero field elements with one exponentiation (Montgomery)."""
    prefix, acc = [], 1
    for v in values:
        prefix.append(acc)
        acc = acc * v % PRIME
    inv = pow(acc, -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _all_but_one(values: Sequence[int]) -> list[int]:
    """c_i = Π_{j≠i} values_j mod PRIME (prefix and suffix products, no inversion)."""
    n = len(values)
    out, acc = [1] * n, 1
    for i in range(n):
        out[i] = acc
        acc = acc * values[i] % PRIME
    acc = 1
    for i in range(n - 1, -1, -1):
        out[i] = out[i] * acc % PRIME
        acc = acc * values[i] % PRIME
    return out


@lru_cache(maxsize=8192)
def _plan(xs: tuple[int, ...], threshold: int) -> tuple[tuple[int, ...],
                                                         tuple[tuple[int, ...], ...]]:
    """For sorted holder x-coordinates: the Lagrange coefficients at 0 over the base (the
    ``threshold`` smallest), and for each further x_e a check vector c (over base + x_e)
    with Σ c_i y_i = 0 iff y_e lies on the base's polynomial: c is the threshold-th divided
    difference over base ∪ {x_e} (zero exactly for degree < threshold), scaled by the
    product of its denominators so that no inversion is needed."""
    _check_xs(xs)
    base = xs[:threshold]
    # W_j = Π_{l≠j} (x_j − x_l), nonzero: the x are distinct elements of the field
    w = [_prod_mod(xj - xl for xl in base if xl != xj) for xj in base]
    sign = -1 if threshold % 2 == 0 else 1  # Π_{l≠j} (x_l − x_j) = (−1)^(t−1) W_j
    num = _prod_mod(base)
    inv = _inverses([xj * wj % PRIME for xj, wj in zip(base, w, strict=True)])
    lam0 = tuple(sign * num * v % PRIME for v in inv)
    checks = []
    for xe in xs[threshold:]:
        dens = [wj * (xj - xe) % PRIME for xj, wj in zip(base, w, strict=True)]
        dens.append(_prod_mod(xe - xl for xl in base))
        checks.append(tuple(_all_but_one(dens)))
    return lam0, tuple(checks)


def _prod_mod(values: Iterable[int]) -> int:
    acc = 1
    for v in values:
        acc = acc * v % PRIME
    return acc


_P_BYTES = np.frombuffer(PRIME.to_bytes(ELEMENT_BYTES, "big"), dtype=np.uint8)


def _field_ok(raw: np.ndarray) -> np.ndarray:
    """Per row of (rows, CHUNKS, ELEMENT_BYTES) big-endian elements: all < PRIME."""
    # v < 2^127 − 1  ⟺  top bit clear and not all of the low 127 bits set
    return ~((raw[:, :, 0] >= 0x80) | (raw == _P_BYTES).all(axis=2)).any(axis=1)


def shares_in_field(shares: Sequence[bytes]) -> bool:
    """Whether every share is SHARE_BYTES long and holds field elements (< PRIME)."""
    if any(len(sh) != SHARE_BYTES for sh in shares):
        return False
    if not shares:
        return True
    raw = np.frombuffer(b"".join(shares), dtype=np.uint8).reshape(-1, CHUNKS, ELEMENT_BYTES)
    return bool(_field_ok(raw).all())


def reconstruct_secrets(batch: Sequence[dict[int, bytes]], threshold: int) -> list[bytes]:
    """Reconstruct many secrets, each from ``{x: share}`` with at least ``threshold``
    entries, using *all* its shares: interpolate from the ``threshold`` smallest x, require
    every other share to lie on that polynomial (else :class:`InconsistentSharesError`).
    Equal to :func:`reconstruct_secret` on consistent shares. Errors carry ``item``, the
    position in ``batch`` of the secret that failed."""
    if not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold {threshold!r} must be a positive int")
    plans, order = [], []
    for item, shares in enumerate(batch):
        if len(shares) < threshold:
            raise ShamirError(f"{len(shares)} shares, need {threshold}", item)
        xs = tuple(sorted(shares))
        try:
            plans.append(_plan(xs, threshold))
        except ShamirError as exc:
            raise ShamirError(str(exc), item) from exc
        row = [shares[x] for x in xs]
        if any(not isinstance(sh, bytes) or len(sh) != SHARE_BYTES for sh in row):
            raise ShamirError(f"share must be {SHARE_BYTES} bytes", item)
        order.append(row)
    flat = [sh for row in order for sh in row]
    if not flat:
        return []
    raw = np.frombuffer(b"".join(flat), dtype=np.uint8).reshape(-1, CHUNKS, ELEMENT_BYTES)
    ok = _field_ok(raw)
    # lanes wide enough for a sum of threshold + 1 products of two field elements
    lane = -(-(2 * 127 + (threshold + 1).bit_length()) // 8)
    padded = np.zeros((raw.shape[0], CHUNKS, lane), dtype=np.uint8)
    padded[:, :, lane - ELEMENT_BYTES :] = raw
    blob, width, bits = padded.tobytes(), CHUNKS * lane, 8 * lane
    mask = (1 << bits) - 1
    shifts = [(CHUNKS - 1 - c) * bits for c in range(CHUNKS)]
    out, pos = [], 0
    for item, ((lam0, checks), row) in enumerate(zip(plans, order, strict=True)):
        m = len(row)
        if not ok[pos : pos + m].all():
            raise ShamirError("share element outside the field", item)
        ys = [int.from_bytes(blob[(pos + j) * width : (pos + j + 1) * width], "big")
              for j in range(m)]
        pos += m
        base = ys[:threshold]
        for c, ye in zip(checks, ys[threshold:], strict=True):
            r = sum(map(mul, c, base)) + c[-1] * ye
            if any(((r >> sh) & mask) % PRIME for sh in shifts):
                raise InconsistentSharesError(
                    "shares do not lie on one polynomial of degree < threshold", item)
        acc = sum(map(mul, lam0, base))
        out.append(_unchunk_item([((acc >> sh) & mask) % PRIME for sh in shifts], item))
    return out


def _unchunk_item(values: Sequence[int], item: int) -> bytes:
    try:
        return _unchunk(values)
    except ShamirError as exc:
        raise ShamirError(str(exc), item) from exc
