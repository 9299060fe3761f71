"""Peak memory of a block of work.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before.
CPU: tracemalloc does not see torch's allocator and ``ru_maxrss`` is a process-lifetime high
water mark that never comes down (a second model measured in the same process would read the
first one's peak), so a background thread samples the resident set size from
/proc/self/statm every few milliseconds and reports the peak above the starting RSS. torch
releases the GIL inside its kernels, so the sampler keeps running during long ops.
"""
from __future__ import annotations

import os
import resource
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size in bytes (Linux /proc; elsewhere the maxrss high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (above the start)."""

    def __init__(self, device="cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self._peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss())
            self.peak_bytes = self._peak - self._base
