"""Shamir t-of-k secret sharing of 32-byte secrets over GF(p), p = 2^127 − 1.

A secret is split into 15-byte chunks (each < p); every chunk gets its own random
polynomial of degree t − 1 with coefficients from the OS CSPRNG. A share is the vector of
chunk evaluations at the holder's x-coordinate. Reconstruction interpolates at 0 with
Lagrange coefficients cached per set of x-coordinates.

:func:`reconstruct_secrets` is the coordinator's batched path: many secrets at once, each
from all the shares it received: interpolated at 0 over every answering holder, and every
share checked to lie on one polynomial of degree < threshold (one random linear combination
of the checks, secret to the reconstructor: a wrong share among more than ``threshold``
passes with probability 2^-127). Its field arithmetic is compiled limb arithmetic
(:mod:`protocols.secagg.gf127`), with the per-sharing-set weights cached in Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from math import prod

import numpy as np

from protocols.secagg import gf127

__all__ = [
    "CHUNKS",
    "PRIME",
    "SHARE_BYTES",
    "InconsistentSharesError",
    "ShamirError",
    "reconstruct_secret",
    "reconstruct_secrets",
    "reconstruct_sorted",
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
_X_LIMIT = 1 << 63  # the compiled path keeps x-coordinates in int64


def _neg_invs(xs: Sequence[int]) -> dict[int, int]:
    """The process-wide table x -> (−x)^-1 mod p, filled for ``xs``."""
    table = _NEG_INV
    for x in xs:
        if x not in table:
            table[x] = pow(-x % PRIME, -1, PRIME)
    return table


def _rho(d: int) -> np.ndarray:
    """Limbs (d, 5) of ρ_0..ρ_{d−1}, the coefficients of the check polynomial R: drawn from
    the OS CSPRNG once per process (extended as needed) and never revealed."""
    while len(_R) < d:
        _R.append(_random_element())
    return np.array([gf127.from_int(v) for v in _R[:d]], dtype=np.int64).reshape(d, 5)


def _fplan(full: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(x, uw) of a sharing set (sorted): x as int64, and per holder the limbs of
    u_j = w_j / (−x_j) and of w_j (barycentric weights), shape (k, 2, 5). For the holders
    H ⊆ full that answered, with M = full \\ H and π_j = Π_{a∈M} (x_j − x_a):
    w^H_j = w_j · π_j and the Lagrange coefficient at 0 is λ_j = Π_{l∈H} (−x_l) · u_j · π_j
    (no per-subset inversion); :func:`gf127.interpolate` evaluates both."""
    _check_xs(full)
    if full and max(full) >= _X_LIMIT:
        raise ShamirError("x-coordinates of the batched path must be < 2^63")
    w = _weights(full)
    ni = _neg_invs(full)
    uw = [gf127.from_int(w[x] * ni[x] % PRIME) + gf127.from_int(w[x]) for x in full]
    return (np.array(full, dtype=np.int64),
            np.array(uw, dtype=np.int64).reshape(len(full), 2, 5))


class _SetTable:
    """Process-wide table of sharing sets for the kernel: row r holds one set's sorted
    x-coordinates (``x[r, :k[r]]``) and weight limbs (``uw[r, j]``); ``ids`` maps the set
    to r. Cleared when it would pass ``limit`` rows (a coordinator sees ~n sets per
    epoch)."""

    def __init__(self, limit: int = 1 << 13) -> None:
        self.limit = limit
        self.clear()

    def clear(self) -> None:
        self.ids: dict[tuple[int, ...], int] = {}
        self.x = np.zeros((64, 1), dtype=np.int64)
        self.uw = np.zeros((64, 1, 2, 5), dtype=np.int64)
        self.k = np.zeros(64, dtype=np.int64)

    def rows(self, sets: Sequence[tuple[int, ...]]) -> np.ndarray:
        """Row ids of ``sets`` (added as needed); ShamirError names the item of a bad set."""
        get = self.ids.get
        out = list(map(get, sets))
        if None in out:
            new = {f for f, r in zip(sets, out, strict=True) if r is None}
            if len(self.ids) + len(new) > self.limit:
                self.clear()
            for item, f in enumerate(sets):
                if self.ids.get(f) is None:
                    try:
                        self._add(f)
                    except ShamirError as exc:
                        raise ShamirError(str(exc), item) from exc
            get = self.ids.get
            out = list(map(get, sets))
        return np.array(out, dtype=np.int64)

    def _add(self, f: tuple[int, ...]) -> None:
        x, uw = _fplan(tuple(sorted(f)))
        r = len(self.ids)
        rows, width = self.x.shape
        if r == rows or len(f) > width:
            grow = (max(rows, 2 * r + 2 if r == rows else rows), max(width, len(f)))
            nx = np.zeros(grow, dtype=np.int64)
            nuw = np.zeros((*grow, 2, 5), dtype=np.int64)
            nk = np.zeros(grow[0], dtype=np.int64)
            nx[:rows, :width], nuw[:rows, :width], nk[:rows] = self.x, self.uw, self.k
            self.x, self.uw, self.k = nx, nuw, nk
        self.x[r, : len(f)], self.uw[r, : len(f)], self.k[r] = x, uw, len(f)
        self.ids[f] = r


_SETS = _SetTable()


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


def _first_bad_item(counts: Sequence[int], flat_ok: np.ndarray) -> int:
    """The batch position of the first False in ``flat_ok`` (one entry per share)."""
    return int(np.searchsorted(np.cumsum(counts), int(np.argmin(flat_ok)), side="right"))


def reconstruct_secrets(batch: Sequence[dict[int, bytes]], threshold: int,
                        full: Sequence[Sequence[int]] | None = None) -> list[bytes]:
    """Reconstruct many secrets, each from ``{x: share}`` with at least ``threshold``
    entries, using *all* its shares, and check that they lie on one polynomial of degree <
    ``threshold`` (else :class:`InconsistentSharesError`). Equal to
    :func:`reconstruct_secret` on consistent shares. ``full[i]`` (optional) names the
    x-coordinates secret i was shared among, so that interpolation weights of the holders
    that answered derive from that set's cached ones. Errors carry ``item``, the position in
    ``batch`` of the secret that failed. x-coordinates must be < 2^63 on this path.

    The check: with m shares at points x_j and barycentric weights w_j, the m − t
    functionals φ_s(y) = Σ_j w_j x_j^s y_j (s < m − t) vanish exactly on the values of
    polynomials of degree < t (they are the interpolant's coefficients of degree ≥ t, up
    to a triangular change of basis). One random combination Σ_j w_j R(x_j) y_j, with R of
    degree < m − t drawn from the OS CSPRNG (once per process) and never revealed, is zero
    for inconsistent shares with probability 1/p ≈ 2^-127 (a rejection tells a cheating
    holder only that its guess was wrong); each chunk is checked on its own. The field
    arithmetic runs compiled (:mod:`protocols.secagg.gf127`)."""
    if not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold {threshold!r} must be a positive int")
    if full is not None and len(full) != len(batch):
        raise ShamirError("full must name one holder set per secret")
    hx: list[int] = []
    rows: list[bytes] = []
    counts: list[int] = []
    sets: list[tuple[int, ...]] = []
    for item, shares in enumerate(batch):
        if len(shares) < threshold:
            raise ShamirError(f"{len(shares)} shares, need {threshold}", item)
        xs = sorted(shares)
        hx += xs
        rows += map(shares.__getitem__, xs)
        counts.append(len(xs))
        f = tuple(xs) if full is None else full[item]
        sets.append(f if type(f) is tuple else tuple(f))
    if not batch:
        return []
    if set(map(type, hx)) != {int} or min(hx) < 1 or max(hx) >= _X_LIMIT:
        for item, shares in enumerate(batch):  # name the item
            try:
                _check_xs(sorted(shares))
                if max(shares) >= _X_LIMIT:
                    raise ShamirError("x-coordinates of the batched path must be < 2^63")
            except ShamirError as exc:
                raise ShamirError(str(exc), item) from exc
    if set(map(type, rows)) != {bytes} or set(map(len, rows)) != {SHARE_BYTES}:
        good = np.array([type(r) is bytes and len(r) == SHARE_BYTES for r in rows])
        raise ShamirError(f"share must be {SHARE_BYTES} bytes", _first_bad_item(counts, good))
    raw = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, SHARE_BYTES)
    return reconstruct_sorted(np.array(hx, dtype=np.int64), counts, raw, threshold, sets)


def reconstruct_sorted(hx: np.ndarray, counts: Sequence[int], raw: np.ndarray,
                       threshold: int, sets: Sequence[tuple[int, ...]]) -> list[bytes]:
    """:func:`reconstruct_secrets` on arrays (the coordinator's path, no per-share Python
    object): secret i's shares are rows ``hoff[i]:hoff[i+1]`` (hoff = cumulative
    ``counts``) of ``raw`` (E, SHARE_BYTES) uint8, from holders ``hx`` (int64, ascending
    within each secret, in (0, 2^63)), shared among ``sets[i]`` (sorted tuples). Each count
    must be ≥ ``threshold`` (checked by the caller)."""
    if len(counts) != len(sets):
        raise ShamirError("one holder set per secret")
    if not len(sets):
        return []
    hoff = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=hoff[1:])
    if raw.shape != (hoff[-1], SHARE_BYTES) or hx.shape != (hoff[-1],):
        raise ShamirError("shares and holders do not match the counts")
    step = np.diff(hx)
    step[hoff[1:-1] - 1] = 1  # group boundaries need not ascend
    if (step <= 0).any() or (len(hx) and hx.min() < 1) or min(counts) < 1:
        raise ShamirError("holders must be ascending x-coordinates in (0, 2^63) per secret")
    rho = _rho(max(int(max(counts)) - threshold, 1))
    out = np.empty((len(sets), CHUNKS, 5), dtype=np.int64)
    status = np.empty(len(sets), dtype=np.int8)
    sets = list(sets)
    while True:
        fid = _SETS.rows(sets)  # first: adding rows may reallocate the table
        t = _SETS
        gf127.interpolate(t.x, t.uw, t.k, fid, hx, hoff, raw, threshold, rho, out, status)
        outside = np.flatnonzero(status == 2)
        if not len(outside):
            break
        for pos in outside.tolist():  # holders outside the named set: their own weights
            sets[pos] = tuple(hx[hoff[pos] : hoff[pos + 1]].tolist())
    if (status == 3).any():
        raise ShamirError("share element outside the field", int(np.argmax(status == 3)))
    elements = gf127.to_be16(out.reshape(-1, 5)).reshape(len(sets), CHUNKS, ELEMENT_BYTES)
    # secret = chunk 0 (15 bytes) ‖ chunk 1 (15) ‖ chunk 2 (2): the rest must be zero
    spill = elements[:, :2, 0].any(axis=1) | elements[:, 2, :14].any(axis=1)
    if status.any() or spill.any():
        item = int(np.argmax((status == 1) | spill))
        if status[item]:
            raise InconsistentSharesError(
                "shares do not lie on one polynomial of degree < threshold", item)
        raise ShamirError("reconstructed value is not a valid secret chunk", item)
    blob = np.concatenate([elements[:, 0, 1:], elements[:, 1, 1:], elements[:, 2, 14:]],
                          axis=1).tobytes()
    return [blob[i : i + SECRET_BYTES] for i in range(0, len(blob), SECRET_BYTES)]
