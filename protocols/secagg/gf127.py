"""Compiled arithmetic in GF(2^127 − 1) for the coordinator's batched Shamir reconstruction.

An element is 5 limbs of 26 bits in int64 (radix 2^26, as Poly1305 does for 2^130 − 5): a
limb product is < 2^54 even for limbs up to 2^27, and 2^130 ≡ 8 (mod 2^127 − 1), so a full
product folds into 5 limbs without leaving int64. :func:`interpolate` runs, for many secrets
at once, exactly the arithmetic that :func:`protocols.secagg.shamir.reconstruct_secrets`
specifies (Lagrange coefficients at 0 of the holders that answered, derived from the
barycentric weights of the set the secret was shared among, and the random consistency
check); it replaces ~15 Python big-int operations per share with compiled limb arithmetic.
Values leave canonical (in [0, p)); the conversions to and from 16-byte big-endian field
elements are vectorised NumPy.
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["from_int", "from_be16", "interpolate", "to_be16"]

_B = 26
_M = (1 << _B) - 1
_M23 = (1 << 23) - 1  # top limb of p = 2^127 − 1 (127 = 4·26 + 23)


def from_int(value: int) -> list[int]:
    """Limbs of a Python int in [0, 2^130)."""
    return [(value >> (_B * i)) & _M for i in range(5)]


def from_be16(raw: np.ndarray) -> np.ndarray:
    """(E, 16) uint8 big-endian elements < 2^127 → (E, 5) int64 limbs."""
    hi = raw[:, :8].copy().view(">u8")[:, 0].astype(np.uint64)
    lo = raw[:, 8:].copy().view(">u8")[:, 0].astype(np.uint64)
    m = np.uint64(_M)
    out = np.empty((raw.shape[0], 5), dtype=np.int64)
    out[:, 0] = lo & m
    out[:, 1] = (lo >> np.uint64(26)) & m
    out[:, 2] = (lo >> np.uint64(52)) | ((hi & np.uint64(0x3FFF)) << np.uint64(12))
    out[:, 3] = (hi >> np.uint64(14)) & m
    out[:, 4] = hi >> np.uint64(40)
    return out


def to_be16(limbs: np.ndarray) -> np.ndarray:
    """(E, 5) canonical int64 limbs → (E, 16) uint8 big-endian."""
    v = limbs.astype(np.uint64)
    lo = v[:, 0] | (v[:, 1] << np.uint64(26)) | ((v[:, 2] & np.uint64(0xFFF)) << np.uint64(52))
    hi = (v[:, 2] >> np.uint64(12)) | (v[:, 3] << np.uint64(14)) | (v[:, 4] << np.uint64(40))
    out = np.empty((v.shape[0], 2), dtype=">u8")
    out[:, 0], out[:, 1] = hi, lo
    return out.view(np.uint8).reshape(-1, 16)


@nb.njit(cache=True, inline="always")
def _carry(r0, r1, r2, r3, r4):  # type: ignore[no-untyped-def]
    """Limbs < 2^62 → the same value mod p with limbs < 2^26 (limb 1 < 2^26 + 2^7)."""
    r1 += r0 >> 26
    r0 &= 0x3FFFFFF
    r2 += r1 >> 26
    r1 &= 0x3FFFFFF
    r3 += r2 >> 26
    r2 &= 0x3FFFFFF
    r4 += r3 >> 26
    r3 &= 0x3FFFFFF
    r0 += 8 * (r4 >> 26)  # 2^130 ≡ 8
    r4 &= 0x3FFFFFF
    r1 += r0 >> 26
    r0 &= 0x3FFFFFF
    return r0, r1, r2, r3, r4


@nb.njit(cache=True, inline="always")
def _mul(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4):  # type: ignore[no-untyped-def]
    """a · b mod p for limbs ≤ 2^27; result limbs < 2^26 (limb 1 < 2^26 + 2^7)."""
    r0 = a0 * b0 + 8 * (a1 * b4 + a2 * b3 + a3 * b2 + a4 * b1)
    r1 = a0 * b1 + a1 * b0 + 8 * (a2 * b4 + a3 * b3 + a4 * b2)
    r2 = a0 * b2 + a1 * b1 + a2 * b0 + 8 * (a3 * b4 + a4 * b3)
    r3 = a0 * b3 + a1 * b2 + a2 * b1 + a3 * b0 + 8 * (a4 * b4)
    r4 = a0 * b4 + a1 * b3 + a2 * b2 + a3 * b1 + a4 * b0
    return _carry(r0, r1, r2, r3, r4)


@nb.njit(cache=True, inline="always")
def _canonical(r0, r1, r2, r3, r4):  # type: ignore[no-untyped-def]
    """Carried limbs → the value's representative in [0, p), limbs < 2^26 (top < 2^23)."""
    for _ in range(3):
        r2 += r1 >> 26
        r1 &= 0x3FFFFFF
        r3 += r2 >> 26
        r2 &= 0x3FFFFFF
        r4 += r3 >> 26
        r3 &= 0x3FFFFFF
        r0 += r4 >> 23  # 2^127 ≡ 1
        r4 &= 0x7FFFFF
        r1 += r0 >> 26
        r0 &= 0x3FFFFFF
    if (r0 == 0x3FFFFFF and r1 == 0x3FFFFFF and r2 == 0x3FFFFFF and r3 == 0x3FFFFFF
            and r4 == 0x7FFFFF):
        return 0, 0, 0, 0, 0
    return r0, r1, r2, r3, r4


@nb.njit(cache=True, inline="always")
def _element(raw, e, c):  # type: ignore[no-untyped-def]
    """Limbs of the big-endian 16-byte element ``raw[e, 16c : 16c + 16]``; (−1, …) if it
    is not < p (top bit set, or all 127 low bits set)."""
    o = 16 * c
    hh = (np.int64(raw[e, o]) << 24) | (np.int64(raw[e, o + 1]) << 16) | (
        np.int64(raw[e, o + 2]) << 8) | np.int64(raw[e, o + 3])
    hl = (np.int64(raw[e, o + 4]) << 24) | (np.int64(raw[e, o + 5]) << 16) | (
        np.int64(raw[e, o + 6]) << 8) | np.int64(raw[e, o + 7])
    lh = (np.int64(raw[e, o + 8]) << 24) | (np.int64(raw[e, o + 9]) << 16) | (
        np.int64(raw[e, o + 10]) << 8) | np.int64(raw[e, o + 11])
    ll = (np.int64(raw[e, o + 12]) << 24) | (np.int64(raw[e, o + 13]) << 16) | (
        np.int64(raw[e, o + 14]) << 8) | np.int64(raw[e, o + 15])
    if hh >= 0x80000000 or (hh == 0x7FFFFFFF and hl == 0xFFFFFFFF and lh == 0xFFFFFFFF
                            and ll == 0xFFFFFFFF):
        return np.int64(-1), np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    return (ll & 0x3FFFFFF, (ll >> 26) | ((lh & 0xFFFFF) << 6),
            (lh >> 20) | ((hl & 0x3FFF) << 12), (hl >> 14) | ((hh & 0xFF) << 18), hh >> 8)


@nb.njit(cache=True)
def interpolate(tx, tuw, tk, fid, hx, hoff, raw, t, rho, out, status):  # type: ignore[no-untyped-def]
    """For each secret i: the holders that answered, ``hx[hoff[i]:hoff[i+1]]`` (ascending),
    their shares ``raw[hoff[i]:hoff[i+1]]`` (E, 48 bytes: 3 big-endian elements), among
    the sharing set r = ``fid[i]``: x-coordinates ``tx[r, :tk[r]]`` (ascending), with
    u_j = w_j / (−x_j) and w_j (barycentric weights) as limbs in ``tuw[r, j]`` (2, 5).
    Writes the secret's chunks at 0 to ``out[i]`` (3, 5) and ``status[i]``: 0 ok,
    1 shares inconsistent (Σ_j w'_j R(x_j) y_j ≠ 0 for some chunk, w' the answering set's
    weights, R = Σ_{s<m−t} rho[s] X^s), 2 a holder outside the sharing set, 3 a share
    element outside the field (nothing written for 2 and 3)."""
    n = fid.shape[0]
    kmax = tx.shape[1]
    hit = np.zeros(kmax, dtype=np.bool_)
    pm = np.zeros((kmax, 5), dtype=np.int64)
    ys = np.zeros((kmax, 3, 5), dtype=np.int64)
    for i in range(n):
        r_, k = fid[i], tk[fid[i]]
        fx = tx[r_]
        h0, m = hoff[i], hoff[i + 1] - hoff[i]
        hit[:k] = False
        j, why = 0, 0
        for h in range(m):
            while j < k and fx[j] < hx[h0 + h]:
                j += 1
            if j == k or fx[j] != hx[h0 + h]:
                why = 2
                break
            hit[j] = True
            for c in range(3):
                y = _element(raw, h0 + h, c)
                if y[0] < 0:
                    why = 3
                for b in range(5):
                    ys[j, c, b] = y[b]
            j += 1
        if why:
            status[i] = why
            continue
        # pm_j = Π_{a missing} (x_j − x_a); l0 = Π_{j answering} (−x_j)
        l0 = (1, 0, 0, 0, 0)
        for j in range(k):
            if not hit[j]:
                continue
            x = fx[j]
            x0, x1, x2 = x & 0x3FFFFFF, (x >> 26) & 0x3FFFFFF, x >> 52  # x < 2^63
            p = (1, 0, 0, 0, 0)
            for a in range(k):
                if hit[a]:
                    continue
                y = fx[a]  # x_j − x_a = x_j + (p − x_a), limbwise (p's limbs are all ones)
                p = _mul(p[0], p[1], p[2], p[3], p[4],
                         x0 + 0x3FFFFFF - (y & 0x3FFFFFF),
                         x1 + 0x3FFFFFF - ((y >> 26) & 0x3FFFFFF),
                         x2 + 0x3FFFFFF - (y >> 52), 0x3FFFFFF, 0x7FFFFF)
            pm[j, 0], pm[j, 1], pm[j, 2], pm[j, 3], pm[j, 4] = p
            l0 = _mul(l0[0], l0[1], l0[2], l0[3], l0[4],
                      0x3FFFFFF - x0, 0x3FFFFFF - x1, 0x3FFFFFF - x2, 0x3FFFFFF, 0x7FFFFF)
        d = m - t
        acc = np.zeros((3, 5), dtype=np.int64)
        chk = np.zeros((3, 5), dtype=np.int64)
        for j in range(k):
            if not hit[j]:
                continue
            u = tuw[r_, j, 0]
            lam = _mul(u[0], u[1], u[2], u[3], u[4],
                       pm[j, 0], pm[j, 1], pm[j, 2], pm[j, 3], pm[j, 4])
            lam = _mul(lam[0], lam[1], lam[2], lam[3], lam[4],
                       l0[0], l0[1], l0[2], l0[3], l0[4])
            for c in range(3):
                y = ys[j, c]
                q = _mul(lam[0], lam[1], lam[2], lam[3], lam[4], y[0], y[1], y[2], y[3], y[4])
                for b in range(5):
                    acc[c, b] += q[b]
            if d > 0:
                x = fx[j]
                x0, x1, x2 = x & 0x3FFFFFF, (x >> 26) & 0x3FFFFFF, x >> 52
                r = (rho[d - 1, 0], rho[d - 1, 1], rho[d - 1, 2], rho[d - 1, 3],
                     rho[d - 1, 4])
                for q_ in range(d - 2, -1, -1):  # Horner: R(x_j)
                    r = _mul(r[0], r[1], r[2], r[3], r[4], x0, x1, x2, 0, 0)
                    r = _carry(r[0] + rho[q_, 0], r[1] + rho[q_, 1], r[2] + rho[q_, 2],
                               r[3] + rho[q_, 3], r[4] + rho[q_, 4])
                w = tuw[r_, j, 1]
                cw = _mul(w[0], w[1], w[2], w[3], w[4],
                          pm[j, 0], pm[j, 1], pm[j, 2], pm[j, 3], pm[j, 4])
                cw = _mul(cw[0], cw[1], cw[2], cw[3], cw[4], r[0], r[1], r[2], r[3], r[4])
                for c in range(3):
                    y = ys[j, c]
                    q = _mul(cw[0], cw[1], cw[2], cw[3], cw[4], y[0], y[1], y[2], y[3], y[4])
                    for b in range(5):
                        chk[c, b] += q[b]
        status[i] = 0
        for c in range(3):
            v = _carry(acc[c, 0], acc[c, 1], acc[c, 2], acc[c, 3], acc[c, 4])
            v = _canonical(v[0], v[1], v[2], v[3], v[4])
            for b in range(5):
                out[i, c, b] = v[b]
            if d > 0:
                z = _carry(chk[c, 0], chk[c, 1], chk[c, 2], chk[c, 3], chk[c, 4])
                z = _canonical(z[0], z[1], z[2], z[3], z[4])
                if z[0] | z[1] | z[2] | z[3] | z[4]:
                    status[i] = 1
