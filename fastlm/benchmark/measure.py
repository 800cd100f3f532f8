"""Timing and peak memory of the calls a benchmark makes (the machine is described by fastlm.device).

Timing: each call is bracketed by marks of fastlm.timing's Clock (CUDA events in the stream, all read after
one synchronisation at the end, so timing adds no host sync between calls; perf_counter on CPU).
Results are medians with the 20th and 80th percentiles: robust to the odd slow call of a shared machine.

Peak memory: on CUDA, torch's peak allocated bytes within the window (bench opens it before it builds a
case, so weights, inputs and a captured graph's pool count); on CPU, how far the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) rose above its size at the start, which is what the case
needed beyond what was already resident (freed memory the allocator kept counts as resident).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm.timing import Clock, quantile


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0-100), linear between samples."""
        return quantile(sorted(self.samples_ms), q / 100)


def time_calls(fn: Callable[[], object], repeat: int, warmup: int, device: torch.device) -> Timing:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeat`` times timed, one sample per call (marks on the
    device's clock around each call, read after one synchronisation at the end)."""
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    clock.sync()
    marks = []
    for _ in range(repeat):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.sync()
    return Timing([clock.ms(start, end) for start, end in marks])


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
