"""Shamir t-of-k secret sharing of 32-byte secrets over GF(p), p = 2^127 − 1.

A secret is split into 15-byte chunks (each < p); every chunk gets its own random
polynomial of degree t − 1 with coefficients from the OS CSPRNG. A share is the vector of
chunk evaluations at the holder's x-coordinate. Reconstruction interpolates at 0 with
Lagrange coefficients cached per set of x-coordinates.

:func:`reconstruct_secrets` is the coordinator's batched path: many secrets at once, each
from all the shares it received, interpolated once from the ``threshold`` smallest
x-coordinates, and every further share checked against that polynomial (one random linear
combination of the checks, secret to the reconstructor: a wrong share among more than
``threshold`` passes with probability 2^-127). The three chunks of a share travel as
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
def _plan(xs: tuple[int, ...], threshold: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For sorted holder x-coordinates: the Lagrange coefficients at 0 over the base (the
    ``threshold`` smallest), and one check vector C over all of ``xs``.

    For each further x_e, the threshold-th divided difference over base ∪ {x_e} is zero
    exactly when y_e lies on the base's polynomial; scaled by the product of its
    denominators it needs no inversion (coefficients c^(e)). C = Σ_e r_e · c^(e) with r_e
    drawn here from the OS CSPRNG and never revealed: if any share is off the polynomial,
    Σ_j C_j y_j ≠ 0 except with probability 1/p ≈ 2^-127 over r (one multiplication per
    share instead of one per share and extra share)."""
    _check_xs(xs)
    base = xs[:threshold]
    # W_j = Π_{l≠j} (x_j − x_l), nonzero: the x are distinct elements of the field
    w = [_prod_mod(xj - xl for xl in base if xl != xj) for xj in base]
    sign = -1 if threshold % 2 == 0 else 1  # Π_{l≠j} (x_l − x_j) = (−1)^(t−1) W_j
    num = _prod_mod(base)
    inv = _inverses([xj * wj % PRIME for xj, wj in zip(base, w, strict=True)])
    lam0 = tuple(sign * num * v % PRIME for v in inv)
    check = [0] * len(xs)
    for e, xe in enumerate(xs[threshold:], threshold):
        dens = [wj * (xj - xe) % PRIME for xj, wj in zip(base, w, strict=True)]
        dens.append(_prod_mod(xe - xl for xl in base))
        c = _all_but_one(dens)
        r = _random_element()
        for j in range(threshold):
            check[j] = (check[j] + r * c[j]) % PRIME
        check[e] = r * c[-1] % PRIME
    return lam0, tuple(check)


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
    every other share to lie on that polynomial (else :class:`InconsistentSharesError`;
    one randomised check per secret, see :func:`_plan`: a wrong share passes with
    probability 2^-127). Equal to :func:`reconstruct_secret` on consistent shares. Errors
    carry ``item``, the position in ``batch`` of the secret that failed."""
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
    if not ok.all():
        bad, pos = int(np.argmin(ok)), 0
        for item, row in enumerate(order):
            pos += len(row)
            if bad < pos:
                raise ShamirError("share element outside the field", item)
    # lanes wide enough for a sum of up to max(m) products of two field elements
    most = max(len(row) for row in order)
    lane = -(-(2 * 127 + most.bit_length()) // 8)
    padded = np.zeros((raw.shape[0], CHUNKS, lane), dtype=np.uint8)
    padded[:, :, lane - ELEMENT_BYTES :] = raw
    blob, width, bits = padded.tobytes(), CHUNKS * lane, 8 * lane
    mask = (1 << bits) - 1
    shifts = [(CHUNKS - 1 - c) * bits for c in range(CHUNKS)]
    out, pos = [], 0
    for item, ((lam0, check), row) in enumerate(zip(plans, order, strict=True)):
        m = len(row)
        ys = [int.from_bytes(blob[j * width : (j + 1) * width], "big")
              for j in range(pos, pos + m)]
        pos += m
        if m > threshold:
            r = sum(map(mul, check, ys))
            if any(((r >> sh) & mask) % PRIME for sh in shifts):
                raise InconsistentSharesError(
                    "shares do not lie on one polynomial of degree < threshold", item)
        acc = sum(map(mul, lam0, ys))
        out.append(_unchunk_item([((acc >> sh) & mask) % PRIME for sh in shifts], item))
    return out


def _unchunk_item(values: Sequence[int], item: int) -> bytes:
    try:
        return _unchunk(values)
    except ShamirError as exc:
        raise ShamirError(str(exc), item) from exc
