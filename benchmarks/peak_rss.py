"""Peak resident memory of this process above its level at entry (the benchmarks' meter).

    with PeakRSS(interval=0.002) as mem:
        run()
    mem.extra  # bytes above the level at entry; mem.extra_gib in GiB
"""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil


class PeakRSS:
    """Peak RSS above the level at entry, sampled every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.extra = 0
        self.extra_gib = 0.0

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.proc = psutil.Process(os.getpid())
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.extra = self.peak - self.base
        self.extra_gib = self.extra / 2**30
