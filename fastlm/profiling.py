"""Phase timing shared by train, bench and profile.

Every training step is split into the phases below. The same names label the timer's buckets, NVTX ranges
and ``torch.profiler.record_function`` ranges, so an Nsight timeline, a torch trace, a py-spy profile and
the breakdown table all speak the same words.

Timing rules: on CUDA, phases are bracketed by CUDA events recorded in the stream and read once per
window (``collect``), never by synchronising inside a phase; on CPU, ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

DATA, FORWARD, BACKWARD, CLIP, OPTIMIZER = "data", "forward", "backward", "clip", "optimizer"
PHASES = (DATA, FORWARD, BACKWARD, CLIP, OPTIMIZER)
EMBEDDING, RNN, DECODER, LOSS = "embedding", "rnn", "decoder", "loss"
FORWARD_PARTS = (EMBEDDING, RNN, DECODER, LOSS)
STEP = "step"


class PhaseTimer:
    """Accumulates per-step durations of named phases (and of the whole step) in milliseconds.

    ``with timer.step(): ... with timer.phase(FORWARD): ...``. Durations are available after
    ``collect()``, which on CUDA waits once for the window's last event.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[str, object, object]] = []  # (name, start, end) not yet read
        self.samples: dict[str, list[float]] = defaultdict(list)

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        start = self._mark()
        try:
            yield
        finally:
            self._pending.append((name, start, self._mark()))

    def step(self):
        return self.phase(STEP)

    def collect(self) -> dict[str, list[float]]:
        """Moves finished measurements into ``samples`` (ms per occurrence) and returns them."""
        if self._pending and self.cuda:
            self._pending[-1][2].synchronize()
        for name, start, end in self._pending:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            self.samples[name].append(ms)
        self._pending.clear()
        return self.samples

    def reset(self) -> None:
        self._pending.clear()
        self.samples.clear()


_active: PhaseTimer | None = None


@contextlib.contextmanager
def active_timer(timer: PhaseTimer | None):
    """Makes ``timer`` the one that ``phase()`` reports to (model code times its parts through it)."""
    global _active
    previous, _active = _active, timer
    try:
        yield timer
    finally:
        _active = previous


def phase(name: str):
    """A timed phase on the active timer; a no-op context when no timer is active."""
    if _active is None or not _active.enabled:
        return contextlib.nullcontext()
    return _active.phase(name)
