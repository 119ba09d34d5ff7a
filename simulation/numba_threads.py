"""numba's parallel kernels follow torch's thread setting (one knob for the user)."""

from __future__ import annotations

import numba
import torch

# numba's pool size, fixed at import from NUMBA_NUM_THREADS (numba.config is built dynamically)
_POOL = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def follow_torch_threads() -> int:
    """Give numba torch's thread count (capped by numba's pool) and return that count, so the
    caller can restore torch's setting after a kernel (numba's pool may reset it)."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, _POOL)))
    return threads
