"""Which device a run uses, and the one description of it that every report carries.

``resolve_device`` turns the ``--device`` flag into a torch.device. ``describe`` is what bench JSON lines,
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

from fastlm.errors import FastlmError


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA where there is none is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastlmError(f"--device {name} was asked for but this torch build or machine has no CUDA device; "
                          f"use --device cpu or auto")
    return torch.device(name)


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
            "git_sha": git_sha(), "host": platform.node()}


def use_threads(threads: Optional[int]) -> None:
    """--threads: how many CPU threads torch computes with (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def machine_load() -> tuple[float, int]:
    """(the 1-minute load average, the cores this process may use). A load above the cores means other work
    competes for them: timings taken meanwhile say more about the machine than about fastlm."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return load, cores


def competing_load(threads: int) -> Optional[str]:
    """Before a timing starts (this process idle): a warning when other work already loads the cores that
    ``threads`` threads will need, else None. The 1-minute load average counts runnable processes; more than
    ``cores - threads`` of them, plus a half for background noise, will take time from the ones being timed."""
    load, cores = machine_load()
    room = max(0, cores - threads) + 0.5
    if load <= room:
        return None
    return (f"the machine's load average is {load:.1f} on {cores} cores before timing {threads} thread(s): other "
            f"work competes for the cores, so these timings are noise (wait for a quiet machine, or use fewer "
            f"--threads)")
