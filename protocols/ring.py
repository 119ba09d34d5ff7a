"""Fixed-point encoding in the ring Z_2^64.

Real numbers are encoded as ``round(x · 2^f)`` in int64; ring arithmetic wraps modulo 2^64
(torch int64 addition and multiplication wrap). Encoding raises instead of wrapping when a
value, or a sum of ``n_summands`` such values, would leave the signed range: that is the
headroom check. Decoding is exact, negatives included (we never use CrypTen's decoder,
which is off by 1.0 for some negatives: DESIGN.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FixedPointRing", "RingOverflowError", "RING_BITS"]

RING_BITS = 64


class RingOverflowError(ValueError):
    """A value (or a sum of values) does not fit the ring's signed fixed-point range."""


@dataclass(frozen=True)
class FixedPointRing:
    """Fixed-point codec for Z_2^64 with ``frac_bits`` fractional bits (default 16).

    The representable magnitude is below ``2^(63 - frac_bits)``; a sum of ``n`` encoded
    values stays exact if each is below ``max_abs / n`` (see :meth:`check_headroom`).
    """

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 48:
            raise ValueError(f"frac_bits must be in [0, 48], got {self.frac_bits}")

    @property
    def scale(self) -> int:
        """The integer scale 2^frac_bits."""
        return 1 << self.frac_bits

    @property
    def max_abs(self) -> float:
        """Largest magnitude that encodes without overflow (exclusive)."""
        return float(2 ** (RING_BITS - 1 - self.frac_bits))

    @property
    def resolution(self) -> float:
        """Quantisation step 2^-frac_bits; encoding error is at most half of it."""
        return 1.0 / self.scale

    def check_headroom(self, max_abs: float, n_summands: int = 1) -> None:
        """Raise :class:`RingOverflowError` if ``n_summands`` values of magnitude ``max_abs``
        could overflow when summed in the ring."""
        if n_summands < 1:
            raise ValueError("n_summands must be >= 1")
        if not np.isfinite(max_abs) or max_abs * n_summands >= self.max_abs:
            raise RingOverflowError(
                f"{n_summands} summands of magnitude {max_abs:g} exceed the ring headroom "
                f"{self.max_abs:g} at {self.frac_bits} fractional bits"
            )

    def encode(self, x: torch.Tensor | np.ndarray | float, n_summands: int = 1) -> torch.Tensor:
        """Encode reals as int64 ring elements; raises on NaN/inf or insufficient headroom."""
        t = torch.as_tensor(x, dtype=torch.float64)
        if t.numel():
            if not bool(torch.isfinite(t).all()):
                raise RingOverflowError("cannot encode NaN or infinite values")
            self.check_headroom(float(t.abs().max()), n_summands)
        return torch.round(t * self.scale).to(torch.int64)

    def decode(self, t: torch.Tensor) -> torch.Tensor:
        """Decode int64 ring elements to float64, exactly (two's complement → signed)."""
        if t.dtype != torch.int64:
            raise TypeError(f"ring elements must be int64, got {t.dtype}")
        # Split so that large magnitudes keep every bit through the float conversion.
        high = torch.div(t, self.scale, rounding_mode="floor")
        low = t - high * self.scale
        return high.to(torch.float64) + low.to(torch.float64) / self.scale

    def encode_int(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embed integers (scale 1) as ring elements; integers are summed exactly."""
        t = torch.as_tensor(x)
        if t.is_floating_point():
            raise TypeError("encode_int takes integer tensors")
        return t.to(torch.int64)
