"""Which device a run uses, and the one description of it that every report carries.

``resolve_device`` turns the ``--device`` flag into a torch.device: ``auto`` takes torch's current accelerator
(``torch.accelerator``: CUDA, XPU, MPS, ...) and the CPU without one; ``device_notes`` says how the choice was
made and which CUDA-only parts of fastlm are off on the device that runs. ``describe`` is what bench JSON lines,
``breakdown.json`` and run folders say about where they were measured: the device (``cpu``, ``cuda:0``), its
human name, the thread count, torch/CUDA/triton versions, the git commit and the host.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from fastlm import memory
from fastlm.errors import FastlmError


def accelerator_type() -> Optional[str]:
    """The type of torch's current accelerator ("cuda", "xpu", "mps", ...), None when there is none."""
    if not hasattr(torch, "accelerator"):  # torch before 2.6 knew CUDA alone this way
        return "cuda" if torch.cuda.is_available() else None
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type


def resolve_device(name: str) -> torch.device:
    """``auto`` takes torch's current accelerator, else the CPU; asking for an accelerator this machine lacks is
    a one-line error."""
    present = accelerator_type()
    if name == "auto":
        return torch.device(present or "cpu")
    device = torch.device(name)
    if device.type != "cpu" and device.type != present:
        raise FastlmError(f"--device {name} was asked for but this torch build or machine has no {device.type} "
                          f"device ({f'its accelerator is {present}' if present else 'it has no accelerator'}); "
                          f"use --device cpu or auto")
    return device


def device_notes(device: torch.device, asked: str, cuda_graphs: bool) -> list[str]:
    """For the run header: how ``--device asked`` became ``device``, and the CUDA-only parts that are off there
    (with why), so a run on another accelerator says what it did not do."""
    how = ("--device auto: torch.accelerator's current accelerator" if asked == "auto" and device.type != "cpu"
           else "--device auto: torch sees no accelerator" if asked == "auto" else f"--device {asked}")
    notes = [f"device: {device} ({how})"]
    if device.type in ("cpu", "cuda"):
        return notes
    off = ["cuDNN (torch.nn's own kernels run the recurrence)", "pinned-memory batch copies on a side stream",
           "device-event phase timing (phases read the host clock, so they show launches; the step totals of a "
           "log window are whole)"]
    if cuda_graphs:
        off.insert(1, "CUDA graphs (steps run eagerly)")
    return notes + [f"off on {device.type} (CUDA only): " + "; ".join(off)]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide the decoder's GEMM rate (vector width, bf16 dot products, AMX tiles).
MATRIX_FEATURES = ("fma", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def git_sha() -> str:
    """The checkout's commit, with "-dirty" when it has uncommitted changes; "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _triton_version() -> Optional[str]:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: torch.device) -> dict:
    """Where a result was measured, the same fields in every report."""
    device = torch.device(device)
    return {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
            "cpu_features": [flag for flag in MATRIX_FEATURES if flag in cpu_flags()],
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": _triton_version(),
            "git_sha": git_sha(), "host": platform.node(), "allocator": memory.setting()}


def use_threads(threads: Optional[int]) -> None:
    """--threads: how many CPU threads torch computes with (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def machine_load() -> tuple[float, int]:
    """(the 1-minute load average, the cores this process may use). Where other work (``crowded``) competes for
    the cores, timings taken meanwhile say more about the machine than about fastlm."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return load, cores


# Set by `fastlm sweep` in each point's environment: the threads of the sweep's other points that may run beside
# it, which count in the load average as the point's own threads do.
SWEEP_THREADS = "FASTLM_SWEEP_THREADS"


def own_threads(threads: int) -> int:
    """The threads of this run that count in the machine's load: ``threads`` of this process, and those of the
    sweep's other points running beside it (SWEEP_THREADS)."""
    try:
        beside = int(os.environ.get(SWEEP_THREADS, "0"))
    except ValueError:
        beside = 0
    return threads + max(0, beside)


def crowded(others: float, cores: int, threads: int) -> bool:
    """Whether work besides ``threads`` threads of ours takes time from them: the 1-minute load average counts
    runnable threads; more of the others' (``others``) than the ``cores - threads`` cores ours leave free, plus
    a half for background noise, do."""
    return others > max(0, cores - threads) + 0.5


class OtherWork:
    """How much CPU other processes used while this one worked: /proc/stat's busy time of the whole machine
    minus this process's own (all its threads), over the interval from construction to ``busy``. Unlike the
    load average, it leaves out this process's own recent work (a tuning in the middle of a run), and it sees
    the interval itself, not the minute before it. Where /proc is not there (not Linux), nothing is seen."""

    OTHER_CORES = 0.3  # average cores of other work above which a timing taken meanwhile is noise

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[tuple[int, int, int]]:
        """(all ticks, busy ticks) of the machine, and this process's user + system ticks; None off Linux."""
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
            with open("/proc/self/stat", encoding="ascii") as own:
                after_name = own.read().rpartition(")")[2].split()
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        return sum(fields[:8]), sum(fields[:8]) - idle, int(after_name[11]) + int(after_name[12])

    def cores(self) -> Optional[float]:
        """The average cores other processes used since construction; None where it cannot be seen."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        total, busy, own = (b - a for a, b in zip(self.start, end))
        if total <= 0:
            return None
        return max(0, busy - own) / (total / (os.cpu_count() or 1))

    def busy(self) -> Optional[str]:
        """A warning when other work used more than OTHER_CORES cores on average since construction, else None."""
        others = self.cores()
        if others is None or others <= self.OTHER_CORES:
            return None
        return (f"other processes used {others:.1f} of {os.cpu_count() or 1} cores while this timing ran, so it is "
                f"noise (wait for a quiet machine)")


def competing_load(threads: int) -> Optional[str]:
    """Before a timing starts (this process idle): a warning when other work already loads the cores that
    ``threads`` threads will need, else None (``crowded``)."""
    load, cores = machine_load()
    if not crowded(load, cores, threads):
        return None
    return (f"the machine's load average is {load:.1f} on {cores} cores before timing {threads} thread(s): other "
            f"work competes for the cores, so these timings are noise (wait for a quiet machine, or use fewer "
            f"--threads)")
