"""Input encoding for secure aggregation: integers exactly, floats by explicit clipping and
fixed-point quantisation, with a headroom check that the sum of n inputs fits Z_2^64.

Flower's SecAgg+ wraps silently when the sum leaves its field; here an input spec whose
n-fold sum could overflow is rejected up front with :class:`InputError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protocols.ring import FixedPointRing, RingOverflowError
from protocols.secagg.errors import InputError

__all__ = ["InputSpec", "MAX_LENGTH"]

MAX_LENGTH = 1 << 26  # 64 Mi entries (512 MiB as int64): larger vectors are rejected
_INT_LIMIT = 2**63


@dataclass(frozen=True)
class InputSpec:
    """How client vectors are encoded.

    ``kind="int"``: integer entries with ``|x| <= bound``, summed exactly.
    ``kind="float"``: entries clipped to ``[-bound, bound]`` then rounded to
    ``frac_bits`` fractional bits; each decoded sum is within ``n · 2^-(frac_bits+1)`` of the
    sum of the clipped inputs.
    """

    kind: str
    length: int
    bound: float
    frac_bits: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float"):
            raise ValueError(f"kind must be 'int' or 'float', got {self.kind!r}")
        if not isinstance(self.length, int) or not 1 <= self.length <= MAX_LENGTH:
            raise ValueError(f"length must be in [1, {MAX_LENGTH}]")
        if not np.isfinite(self.bound) or self.bound <= 0:
            raise ValueError("bound must be a positive finite number")
        FixedPointRing(self.frac_bits)  # validates frac_bits
        if self.kind == "int" and int(self.bound) != self.bound:
            raise ValueError("integer bound must be an integer")

    @property
    def ring(self) -> FixedPointRing:
        return FixedPointRing(self.frac_bits if self.kind == "float" else 0)

    def check_headroom(self, n_clients: int) -> None:
        """Raise :class:`InputError` if n inputs at the bound could overflow the ring."""
        try:
            if self.kind == "int":
                if int(self.bound) * n_clients >= _INT_LIMIT:
                    raise RingOverflowError(
                        f"{n_clients} integers of magnitude {int(self.bound)} exceed 2^63"
                    )
            else:
                # rounding may add half a step per summand
                self.ring.check_headroom(self.bound + self.ring.resolution, n_clients)
        except RingOverflowError as exc:
            raise InputError(f"input spec does not fit the ring: {exc}") from exc

    def error_bound(self, n_clients: int) -> float:
        """Worst-case |decoded sum − sum of clipped inputs| per entry."""
        return 0.0 if self.kind == "int" else n_clients * self.ring.resolution / 2

    def encode(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Validate, clip (floats) and encode one client's vector as int64 ring elements."""
        t = torch.as_tensor(x)
        if t.dim() != 1 or t.numel() != self.length:
            raise InputError(f"input must be a 1-D vector of length {self.length}, got "
                             f"shape {tuple(t.shape)}")
        if self.kind == "int":
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise InputError(f"integer input expected, got {t.dtype}")
            t = t.to(torch.int64)
            if t.numel() and int(t.abs().max()) > int(self.bound):
                raise InputError(f"integer input exceeds the declared bound {int(self.bound)}")
            return t.contiguous()
        if not t.is_floating_point():
            raise InputError(f"float input expected, got {t.dtype}")
        t = t.to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise InputError("float input contains NaN or inf")
        return self.ring.encode(t.clamp(-self.bound, self.bound))

    def decode(self, total: torch.Tensor) -> torch.Tensor:
        """Decode an aggregated int64 ring vector (int64 for ints, float64 for floats)."""
        if self.kind == "int":
            return total.clone()
        return self.ring.decode(total)
