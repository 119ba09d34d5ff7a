"""Optional output noise for the neighbourhood sum: discrete Laplace in fixed-point units,
drawn from a ChaCha20 keystream (never from a non-cryptographic RNG) and clipped.

The difference of two i.i.d. geometric variables with ``P(G = k) = (1-q) q^k`` is discrete
Laplace with ``P(X = k) ∝ q^|k|``; ``q = exp(-1 / scale_ulps)``. The geometric variables are
obtained by inversion from 53-bit uniforms; the floating-point sampling is not hardened
against floating-point side channels.
"""

from __future__ import annotations

import torch

from protocols.keys import ring_keystream


def discrete_laplace(
    key: bytes, n: int, scale: float, bound: float, frac_bits: int
) -> torch.Tensor:
    """``n`` noise values in ring units (int64): scale and bound given in value units."""
    if n == 0 or scale <= 0.0:
        return torch.zeros(n, dtype=torch.int64)
    scale_ulps = scale * 2.0**frac_bits
    bound_ulps = int(bound * 2.0**frac_bits)
    raw = ring_keystream(key, 2 * n)
    u = ((raw >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(1.0).mul_(2.0**-53)  # (0, 1]
    log_q = -1.0 / scale_ulps
    g = torch.floor(torch.log(u) / log_q)
    g = torch.clamp(g, max=float(2**52))
    noise = (g[:n] - g[n:]).clamp_(-bound_ulps, bound_ulps)
    return noise.to(torch.int64)
