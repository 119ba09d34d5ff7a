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
from collections.abc import Sequence
from functools import lru_cache
from math import prod
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
    if xs and (set(map(type, xs)) - {int} or not 0 < min(xs) <= max(xs) < PRIME):
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


@lru_cache(maxsize=4096)
def _weights(xs: tuple[int, ...]) -> dict[int, int]:
    """Barycentric weights {x_j: 1 / Π_{l≠j} (x_j − x_l)} of distinct x-coordinates."""
    _check_xs(xs)
    dens = [prod([xj - xl for xl in xs if xl != xj]) % PRIME for xj in xs]
    return dict(zip(xs, _inverses(dens), strict=True))


_NEG_INV: dict[int, int] = {}  # x -> (−x)^-1 mod p
_R: list[int] = []  # coefficients ρ_s of the secret check polynomial R (see below)
_R_AT: dict[int, dict[int, int]] = {}  # d -> {x: R_d(x)}


def _neg_invs(xs: Sequence[int]) -> dict[int, int]:
    """The process-wide table x -> (−x)^-1 mod p, filled for ``xs``."""
    table = _NEG_INV
    for x in xs:
        if x not in table:
            table[x] = pow(-x % PRIME, -1, PRIME)
    return table


def _r_table(d: int, xs: Sequence[int]) -> dict[int, int]:
    """x -> R_d(x) = Σ_{s<d} ρ_s x^s, filled for ``xs``; ρ is drawn once per process from
    the OS CSPRNG and never revealed."""
    while len(_R) < d:
        _R.append(_random_element())
    table = _R_AT.get(d)
    if table is None:
        table = _R_AT[d] = {}
    coeffs = _R[:d][::-1]
    for x in xs:
        if x not in table:
            v = 0
            for c in coeffs:
                v = (v * x + c) % PRIME
            table[x] = v
    return table


@lru_cache(maxsize=16384)
def _plan(xs: tuple[int, ...], full: tuple[int, ...] | None,
          threshold: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(λ, C) for sorted holder x-coordinates ``xs``: λ_j, the Lagrange coefficients at 0
    over all of ``xs``, and C_j = w_j · R_d(x_j) (d = m − threshold; empty if d = 0), the
    consistency check (see :func:`reconstruct_secrets`). w_j are the barycentric weights;
    if ``xs`` is a subset of ``full`` (the holders the secret was shared among) they come
    from full's cached ones by removing the missing points (w_j · Π_missing (x_j − x_a)),
    O(k) per missing holder instead of O(k²)."""
    _check_xs(xs)
    have = set(xs)
    if full is not None and full != xs and have <= set(full):
        wf = _weights(full)
        missing = [x for x in full if x not in have]
        w = [wf[xj] * prod([xj - xa for xa in missing]) % PRIME for xj in xs]
    else:
        wf = _weights(xs)
        w = [wf[xj] for xj in xs]
    # λ_j = Π_{l≠j} (0 − x_l) / (x_j − x_l) = w_j · Π_{l≠j} (−x_l) = w_j · l0 / (−x_j)
    l0 = prod([-x for x in xs]) % PRIME
    ni = _neg_invs(xs)
    lam = tuple([wj * l0 % PRIME * ni[x] % PRIME for x, wj in zip(xs, w, strict=True)])
    d = len(xs) - threshold
    if not d:
        return lam, ()
    rt = _r_table(d, xs)
    return lam, tuple([wj * rt[x] % PRIME for x, wj in zip(xs, w, strict=True)])


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


def reconstruct_secrets(batch: Sequence[dict[int, bytes]], threshold: int,
                        full: Sequence[Sequence[int]] | None = None) -> list[bytes]:
    """Reconstruct many secrets, each from ``{x: share}`` with at least ``threshold``
    entries, using *all* its shares, and check that they lie on one polynomial of degree <
    ``threshold`` (else :class:`InconsistentSharesError`). Equal to
    :func:`reconstruct_secret` on consistent shares. ``full[i]`` (optional) names the
    x-coordinates secret i was shared among, so that interpolation weights of the holders
    that answered derive from that set's cached ones. Errors carry ``item``, the position in
    ``batch`` of the secret that failed.

    The check: with m shares at points x_j and barycentric weights w_j, the m − t
    functionals φ_s(y) = Σ_j w_j x_j^s y_j (s < m − t) vanish exactly on the values of
    polynomials of degree < t (they are the interpolant's coefficients of degree ≥ t, up
    to a triangular change of basis). One random combination Σ_j w_j R(x_j) y_j, with R of
    degree < m − t drawn from the OS CSPRNG (once per process) and never revealed, is zero
    for inconsistent shares with probability 1/p ≈ 2^-127 (a rejection tells a cheating
    holder only that its guess was wrong), and costs one multiplication per share."""
    if not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold {threshold!r} must be a positive int")
    if full is not None and len(full) != len(batch):
        raise ShamirError("full must name one holder set per secret")
    plans, order = [], []
    for item, shares in enumerate(batch):
        if len(shares) < threshold:
            raise ShamirError(f"{len(shares)} shares, need {threshold}", item)
        xs = tuple(sorted(shares))
        try:
            f = None if full is None else full[item]
            plans.append(_plan(xs, f if f is None or type(f) is tuple else tuple(f), threshold))
        except ShamirError as exc:
            raise ShamirError(str(exc), item) from exc
        row = [shares[x] for x in xs]
        if set(map(type, row)) != {bytes} or set(map(len, row)) != {SHARE_BYTES}:
            raise ShamirError(f"share must be {SHARE_BYTES} bytes", item)
        order.append((xs, row))
    flat = [sh for _, row in order for sh in row]
    if not flat:
        return []
    raw = np.frombuffer(b"".join(flat), dtype=np.uint8).reshape(-1, CHUNKS, ELEMENT_BYTES)
    ok = _field_ok(raw)
    if not ok.all():
        bad, pos = int(np.argmin(ok)), 0
        for item, (_, row) in enumerate(order):
            pos += len(row)
            if bad < pos:
                raise ShamirError("share element outside the field", item)
    # lanes wide enough for a sum of up to max(m) products of two field elements
    most = max(len(row) for _, row in order)
    lane = -(-(2 * 127 + most.bit_length()) // 8)
    padded = np.zeros((raw.shape[0], CHUNKS, lane), dtype=np.uint8)
    padded[:, :, lane - ELEMENT_BYTES :] = raw
    blob, width, bits = padded.tobytes(), CHUNKS * lane, 8 * lane
    mask = (1 << bits) - 1
    shifts = [(CHUNKS - 1 - c) * bits for c in range(CHUNKS)]
    out, pos = [], 0
    for item, ((lam, check), (_, row)) in enumerate(zip(plans, order, strict=True)):
        m = len(row)
        ys = [int.from_bytes(blob[j * width : (j + 1) * width], "big")
              for j in range(pos, pos + m)]
        pos += m
        if check:
            r = sum(map(mul, check, ys))
            if any(((r >> sh) & mask) % PRIME for sh in shifts):
                raise InconsistentSharesError(
                    "shares do not lie on one polynomial of degree < threshold", item)
        acc = sum(map(mul, lam, ys))
        out.append(_unchunk_item([((acc >> sh) & mask) % PRIME for sh in shifts], item))
    return out


def _unchunk_item(values: Sequence[int], item: int) -> bytes:
    try:
        return _unchunk(values)
    except ShamirError as exc:
        raise ShamirError(str(exc), item) from exc
