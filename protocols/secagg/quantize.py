"""Input encoding for secure aggregation: integers exactly, floats by explicit clipping and
fixed-point quantisation, with a headroom check that the sum of n inputs fits Z_2^64.

Flower's SecAgg+ wraps silently when the sum leaves its field; here an input spec whose
n-fold sum could overflow is rejected up front with :class:`InputError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protocols.ring import FixedPointRing, RingOverflowError
from protocols.secagg.errors import ConfigError, InputError

__all__ = ["InputSpec", "MAX_LENGTH"]

_TORCH_OK = {
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
    torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
}

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
            raise ConfigError(f"kind must be 'int' or 'float', got {self.kind!r}")
        if (not isinstance(self.length, int) or isinstance(self.length, bool)
                or not 1 <= self.length <= MAX_LENGTH):
            raise ConfigError(f"length must be an int in [1, {MAX_LENGTH}]")
        if (not isinstance(self.bound, (int, float)) or isinstance(self.bound, bool)
                or not math.isfinite(self.bound) or self.bound <= 0):
            raise ConfigError("bound must be a positive finite number")
        if (not isinstance(self.frac_bits, int) or isinstance(self.frac_bits, bool)
                or not 0 <= self.frac_bits <= 48):
            raise ConfigError(f"frac_bits must be an int in [0, 48], got {self.frac_bits!r}")
        if self.kind == "int" and (int(self.bound) != self.bound or self.bound >= _INT_LIMIT):
            raise ConfigError("integer bound must be an integer below 2^63")

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

    def encode(self, x: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
        """Validate, clip (floats) and encode one client's vector as int64 ring elements.

        Integers are range-checked exactly in their own dtype before any conversion (no
        ``abs`` overflow at int64's minimum, no wrap of unsigned values); anything that is not
        a real-valued 1-D vector of the declared length raises :class:`InputError`.
        """
        arr = _as_array(x)
        if arr.ndim != 1 or arr.shape[0] != self.length:
            raise InputError(f"input must be a 1-D vector of length {self.length}, got "
                             f"shape {tuple(arr.shape)}")
        if self.kind == "int":
            if arr.dtype.kind not in "iu":
                raise InputError(f"integer input expected, got {arr.dtype}")
            bound = int(self.bound)
            if arr.size and (int(arr.max()) > bound or int(arr.min()) < -bound):
                raise InputError(f"integer input exceeds the declared bound {bound}")
            return torch.from_numpy(arr.astype(np.int64, copy=True))
        if arr.dtype.kind != "f":
            raise InputError(f"float input expected, got {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.float64, copy=True))
        if not bool(torch.isfinite(t).all()):
            raise InputError("float input contains NaN or inf")
        return self.ring.encode(t.clamp(-self.bound, self.bound))

    def decode(self, total: torch.Tensor) -> torch.Tensor:
        """Decode an aggregated int64 ring vector (int64 for ints, float64 for floats)."""
        if self.kind == "int":
            return total.clone()
        return self.ring.decode(total)


def _as_array(x: object) -> np.ndarray:
    """A CPU NumPy view/copy of a tensor, array or list of real numbers; InputError else."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in _TORCH_OK:
            raise InputError(f"unsupported tensor dtype {x.dtype}")
        if x.device.type == "meta" or x.is_sparse or x.layout != torch.strided:
            raise InputError("input must be a dense tensor with data (not meta or sparse)")
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        try:
            return t.contiguous().numpy()
        except (TypeError, RuntimeError) as exc:
            raise InputError(f"cannot read the input tensor: {exc}") from exc
    if isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
               for v in x):
            raise InputError("list input must hold only int or float numbers")
        try:
            arr = np.asarray(x)
        except (OverflowError, ValueError) as exc:
            raise InputError(f"cannot convert the input: {exc}") from exc
    else:
        raise InputError(f"input must be a tensor, array or list, got {type(x).__name__}")
    if arr.dtype.kind not in "iuf" or arr.dtype.itemsize > 8:
        raise InputError(f"input must hold int or float numbers of at most 64 bits, got "
                         f"{arr.dtype}")
    return arr
