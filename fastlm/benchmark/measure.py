"""Timing and peak memory of the calls a benchmark makes (the machine is described by fastlm.device).

Timing: on CUDA each call is bracketed by CUDA events recorded in the stream and all of them are read
after one synchronisation at the end, so timing adds no host sync between calls; on CPU, perf_counter.
Results are medians with the 20th and 80th percentiles: robust to the odd slow call of a shared machine.

Peak memory: on CUDA, torch's peak allocated bytes during the timed calls; on CPU, how far the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) rose above its size before them, which is
what the calls needed beyond what was already resident (freed memory the allocator kept counts as resident).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0-100), linear between samples."""
        ordered = sorted(self.samples_ms)
        position = (len(ordered) - 1) * q / 100
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_calls(fn: Callable[[], object], repeat: int, warmup: int, device: torch.device) -> Timing:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeat`` times timed, one sample per call."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Timing([start.elapsed_time(end) for start, end in events])
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(samples)


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb``: see the module doc for what it counts."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mb: Optional[float] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_cpu_peak = _reset_peak_rss()
            self._rss_before = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._reset_cpu_peak and self._rss_before is not None:
            peak = _status_kb("VmHWM")
            self.mb = max(0.0, (peak - self._rss_before) / 1024) if peak is not None else None
        return False


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
