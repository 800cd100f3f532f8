"""The one clock, and phase timing shared by train, bench and profile.

``Clock`` is how fastlm reads time everywhere: on CUDA, events recorded in the stream and read once per
window (``collect``), never by synchronising inside a phase, so that timing never stalls the work it times;
on CPU, ``time.perf_counter``.

Every training step is split into the phases below. The same names label the timer's buckets, NVTX ranges
and ``torch.profiler.record_function`` ranges, so an Nsight timeline, a torch trace and the breakdown table
all speak the same words. NVTX ranges (through the ``nvtx`` package, a no-op unless a profiler is attached)
are always on; ``record_function``, which costs time even with no profiler running, is entered only while a
torch profiler is active (what each costs: bench/README.md, "Phase labels").
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from typing import Callable, Optional

import torch

DATA, FORWARD, BACKWARD, CLIP, OPTIMIZER = "data", "forward", "backward", "clip", "optimizer"
PHASES = (DATA, FORWARD, BACKWARD, CLIP, OPTIMIZER)
EMBEDDING, RNN, DECODER, LOSS = "embedding", "rnn", "decoder", "loss"
FORWARD_PARTS = (EMBEDDING, RNN, DECODER, LOSS)
# Backward in the order autograd runs it: the decoder's and the loss's gradients, then back-propagation through
# time in the recurrent layers, then the embedding's gradient. The model marks where the gradient reaches the
# recurrent layers' output and input (split_when_gradient_reaches), which is where one part ends.
DECODER_GRAD, RNN_GRAD, EMBEDDING_GRAD = "decoder_grad", "rnn_grad", "embedding_grad"
BACKWARD_PARTS = (DECODER_GRAD, RNN_GRAD, EMBEDDING_GRAD)
# Data-parallel steps (fastlm.step.data_parallel): backward's gradients, then the part of DistributedDataParallel's
# gradient all-reduce that did not overlap them (backward returns only once it is done).
GRADIENTS, ALLREDUCE = "gradients", "allreduce"
STEP = "step"
NVTX_DOMAIN = "fastlm"


@functools.cache
def nvtx_range_functions() -> tuple[Callable[[str], None], Callable[[], None]]:
    """(push(name), pop()) for NVTX ranges: the ``nvtx`` package when installed, else torch.cuda.nvtx on a
    CUDA machine, else no-ops. torch.cuda.nvtx raises on CPU-only torch builds, hence the order."""
    try:
        import nvtx
    except ImportError:
        nvtx = None
    if nvtx is not None:
        return (lambda name: nvtx.push_range(message=name, domain=NVTX_DOMAIN),
                lambda: nvtx.pop_range(domain=NVTX_DOMAIN))
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    return (lambda name: None), (lambda: None)


class Clock:
    """Time marks on ``device``'s timeline. ``mark()`` records one (a CUDA event, or perf_counter seconds);
    ``ms(start, end)`` reads the time between two marks once they are done (``wait`` or ``sync`` first on
    CUDA). Events that were read can be handed back with ``reuse`` so that a loop does not create new ones."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._free_events: list = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def wait(self, mark) -> None:
        """Until ``mark`` (and everything recorded before it) is done."""
        if self.cuda:
            mark.synchronize()

    def sync(self) -> None:
        """Until all work queued on the device is done."""
        if self.cuda:
            torch.cuda.synchronize()

    def reuse(self, *marks) -> None:
        if self.cuda:
            self._free_events.extend(marks)


def quantile(ordered: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of an already sorted list, linear between closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stats(values: list[float]) -> dict:
    """mean, median, p20, p80, min, max and n of a list of timings."""
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p20": quantile(ordered, 0.2), "p80": quantile(ordered, 0.8), "min": ordered[0], "max": ordered[-1],
            "n": len(ordered)}


torch_profiler_active = torch.autograd._profiler_enabled  # True while a torch.profiler records; cheap to ask


class _Phase:
    """The context ``PhaseTimer.phase`` returns: labels (NVTX, torch profiler) outside, time marks inside."""

    __slots__ = ("timer", "name", "label", "start")

    def __init__(self, timer: "PhaseTimer", name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        timer = self.timer
        timer._open_phase(self.name)
        self.label = torch.profiler.record_function(self.name) if torch_profiler_active() else None
        if self.label is not None:
            self.label.__enter__()
        self.start = timer.clock.mark()
        timer._boundaries.append([self.start, self.start])
        return self

    def __exit__(self, *exc):
        timer = self.timer
        end = timer.clock.mark()
        if self.label is not None:
            self.label.__exit__(*exc)
        timer._close_phase(self.name, self.start, end)
        return False


class _Unlabelled:
    """A disabled timer's phase: nothing timed, nothing labelled."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_UNLABELLED = _Unlabelled()


class PhaseTimer:
    """Accumulates per-step durations of named phases (and of the whole step) in milliseconds.

    ``with timer.step(): ... with timer.phase(FORWARD): ...``. Durations are available after
    ``collect()``, which on CUDA waits once for the window's last event:

    - ``samples[name]``: ms per occurrence of a phase;
    - ``per_step``: one {name: ms} per finished step, a phase entered several times in a step summed;
    - ``parents[name]``: the phase that enclosed ``name`` when it was first seen (None at top level), so a
      report can tell the step's own phases from their parts without knowing the names in advance.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        # Backward's parts (BACKWARD_PARTS) cost two autograd hooks and three marks a step: only `fastlm
        # profile`, which reports them, turns them on; training logs the step's phases alone.
        self.backward_parts = False
        self.clock = Clock(device)
        self._pending: list[tuple[str, object, object, Optional[int]]] = []  # (name, start, end, step) not yet read
        self._open: list[str] = []
        self._boundaries: list = []  # per open phase: [its start, where its latest part ended (or its start)]
        self._step_number: Optional[int] = None  # the step in progress, or None between steps
        self._steps_started = 0
        self._push, self._pop = nvtx_range_functions()
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.per_step: list[dict[str, float]] = []
        self.parents: dict[str, Optional[str]] = {}

    def _open_phase(self, name: str) -> None:
        if name == STEP:
            self._step_number = self._steps_started
            self._steps_started += 1
        if name not in self.parents:
            self.parents[name] = self._open[-1] if self._open else None
        self._open.append(name)
        self._push(name)

    def _close_phase(self, name: str, start, end) -> None:
        self._pop()
        self._open.pop()
        self._boundaries.pop()
        self._pending.append((name, start, end, self._step_number))
        if name == STEP:
            self._step_number = None

    def phase(self, name: str):
        return _Phase(self, name) if self.enabled else _UNLABELLED

    def split(self, name: str) -> None:
        """Here ends a part named ``name`` of the open phase, begun at the phase's start or where its previous
        part ended. For work timed from inside (autograd's backward, through tensor hooks), where no context
        manager can bracket it."""
        if not self.enabled or not self._open:
            return
        end = self.clock.mark()
        self.parents.setdefault(name, self._open[-1])
        self._pending.append((name, self._boundaries[-1][1], end, self._step_number))
        self._boundaries[-1][1] = end

    def split_rest(self, name: str) -> None:
        """The rest of the open phase is its part ``name``, provided it was split into parts at all: a phase
        nobody split stays whole."""
        if self.enabled and self._open and self._boundaries[-1][1] is not self._boundaries[-1][0]:
            self.split(name)

    def step(self):
        return self.phase(STEP)

    def collect(self) -> dict[str, list[float]]:
        """Moves finished measurements into ``samples`` and ``per_step`` (ms) and returns ``samples``."""
        if self._pending:
            self.clock.wait(self._pending[-1][2])  # the last phase closed is the last mark recorded
        steps: dict[int, dict[str, float]] = {}
        read = {}  # the marks read, each once: a part's end is also the next part's start
        for name, start, end, step_number in self._pending:
            ms = self.clock.ms(start, end)
            self.samples[name].append(ms)
            if step_number is not None:
                totals = steps.setdefault(step_number, {})
                totals[name] = totals.get(name, 0.0) + ms
            read[id(start)], read[id(end)] = start, end
        self.clock.reuse(*read.values())
        # per_step holds finished steps only: collect() is called between steps.
        self.per_step.extend(totals for _, totals in sorted(steps.items()) if STEP in totals)
        self._pending.clear()
        return self.samples

    def reset(self) -> None:
        self._pending.clear()
        self.samples.clear()
        self.per_step.clear()


_active: PhaseTimer | None = None


class active_timer:
    """``with active_timer(timer):`` makes ``timer`` the one ``phase()`` reports to (model code times its
    parts through it); the previous one comes back on exit."""

    __slots__ = ("timer", "previous")

    def __init__(self, timer: PhaseTimer | None):
        self.timer = timer

    def __enter__(self):
        global _active
        self.previous, _active = _active, self.timer
        return self.timer

    def __exit__(self, *exc):
        global _active
        _active = self.previous
        return False


def phase(name: str):
    """A timed phase on the active timer; a no-op context when no timer is active."""
    if _active is None or not _active.enabled:
        return _UNLABELLED
    return _active.phase(name)


def split_when_gradient_reaches(tensor: torch.Tensor, name: str) -> None:
    """In backward, end the active timer's part ``name`` of the open phase when ``tensor``'s gradient has been
    computed (how the model marks where back-propagation reaches the recurrent layers, and leaves them)."""
    timer = _active
    if timer is not None and timer.enabled and timer.backward_parts and tensor.requires_grad:
        tensor.register_hook(lambda grad: timer.split(name))
