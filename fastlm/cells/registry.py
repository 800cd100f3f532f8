"""The (cell, backend) registry.

A backend registers a factory per cell and a probe that says whether it can run here (and why not).
Probes run lazily, once, so importing fastlm.cells stays cheap and an optional dependency (triton) is only
touched when someone asks for that backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

# None of the backend modules imports triton: the triton backend imports its kernels on the first build.
from fastlm.cells import compile as compile_backend
from fastlm.cells import triton as triton_backend
from fastlm.cells.cudnn import CUDNN_STACKS
from fastlm.cells.reference import ReferenceStack
from fastlm.cells.script import ScriptStack
from fastlm.config import CELLS
from fastlm.errors import FastlmError


@dataclass(frozen=True)
class _Backend:
    factories: dict  # cell -> callable(input_size, hidden_size, num_layers, dropout[, variant=]) -> module
    probe: Callable[[], Optional[str]]  # returns None when usable, else the reason it is not
    description: str
    variants: tuple = ()  # the values its factories take as variant=; () for a backend with one variant


_REGISTRY: dict[str, _Backend] = {}
BACKENDS: tuple = ()


def register(name: str, factories: dict, probe: Callable[[], Optional[str]] = lambda: None, description: str = "",
             variants: tuple = ()):
    global BACKENDS
    _REGISTRY[name] = _Backend(dict(factories), functools.cache(probe), description, tuple(variants))
    BACKENDS = tuple(_REGISTRY)


def variants(backend: str) -> tuple:
    """The variant values ``build`` accepts for ``backend``: () when it has one way to run (then only None
    or "auto", every backend's default, are accepted)."""
    return _REGISTRY[backend].variants if backend in _REGISTRY else ()


def unavailable_reason(cell: str, backend: str) -> Optional[str]:
    """None when (cell, backend) can be built here; otherwise a sentence saying why not."""
    if cell not in CELLS:
        return f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}"
    if backend not in _REGISTRY:
        return f"unknown backend {backend!r}; choose one of {', '.join(_REGISTRY)}"
    entry = _REGISTRY[backend]
    if cell not in entry.factories:
        return f"backend {backend!r} has no {cell} cell (it has {', '.join(entry.factories)})"
    return entry.probe()


def registered() -> list[tuple[str, str]]:
    """Every (cell, backend) pair fastlm has, whether or not it can run on this machine."""
    return [(cell, name) for name, entry in _REGISTRY.items() for cell in entry.factories]


# What a backend really runs on each kind of device (the name "cudnn" is torch.nn's, which on a CPU is not cuDNN).
_RUNS_AS = {
    ("reference", "cpu"): "plain PyTorch loop", ("reference", "cuda"): "plain PyTorch loop",
    ("cudnn", "cpu"): "torch.nn on CPU (ATen/oneDNN kernels)", ("cudnn", "cuda"): "torch.nn on cuDNN",
    ("script", "cpu"): "TorchScript loop", ("script", "cuda"): "TorchScript loop (fused pointwise on GPU)",
    ("triton", "cpu"): "Triton kernels, interpreted", ("triton", "cuda"): "Triton kernels, compiled",
    ("compile", "cpu"): "torch.compile (Inductor, C++)", ("compile", "cuda"): "torch.compile (Inductor, Triton)",
}


def runs_as(backend: str, device_type: str) -> str:
    """How ``backend`` computes on a device of ``device_type`` ("cpu", "cuda", or another accelerator), in words
    for reports."""
    if backend == "cudnn" and device_type not in ("cpu", "cuda"):
        return f"torch.nn on {device_type} (its own kernels; cuDNN is CUDA's)"
    return _RUNS_AS.get((backend, device_type), backend)


def check_runs_on(backend: str, device_type: str) -> None:
    """FastlmError when ``backend`` cannot run on a device of ``device_type``: the Triton kernels are compiled
    for CUDA or interpreted on the CPU, and fastlm has not tried them on other accelerators."""
    if backend == "triton" and device_type not in ("cpu", "cuda"):
        raise FastlmError(f"--backend triton runs compiled on CUDA or interpreted on the CPU, not on {device_type}; "
                          f"use --backend cudnn (torch.nn's layers) there")


def available() -> list[tuple[str, str]]:
    """Every (cell, backend) pair that can be built on this machine."""
    return [(cell, name) for name, entry in _REGISTRY.items() for cell in entry.factories
            if entry.probe() is None]


def build(cell: str, backend: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
          variant: Optional[str] = None):
    """The (cell, backend) stack. ``variant``: None or "auto" is every backend's default; a backend with
    variants (``variants(backend)``: triton's "per-step", "persistent", "auto") takes any of them."""
    cell, backend = cell.lower(), backend.lower()
    reason = unavailable_reason(cell, backend)
    if reason is not None:
        here = ", ".join(f"{c}/{b}" for c, b in available())
        raise FastlmError(f"cannot build {cell}/{backend}: {reason} (available here: {here})")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if int(value) < 1:
            raise FastlmError(f"{name} must be at least 1, got {value}")
    if not 0.0 <= float(dropout) < 1.0:
        raise FastlmError(f"dropout must be in [0, 1), got {dropout}")
    entry = _REGISTRY[backend]
    extra = {}
    if variant is not None and (entry.variants or variant != "auto"):
        if variant not in entry.variants:
            offered = ", ".join(entry.variants) if entry.variants else "none besides auto"
            raise FastlmError(f"backend {backend!r} has no variant {variant!r} (variants: {offered})")
        extra["variant"] = variant
    return entry.factories[cell](int(input_size), int(hidden_size), int(num_layers), float(dropout), **extra)


def _register_builtin_backends() -> None:
    register("reference", {cell: functools.partial(ReferenceStack, cell) for cell in CELLS},
             description="plain PyTorch loop, fp32: the oracle")
    register("cudnn", CUDNN_STACKS, description="torch.nn (cuDNN on GPU, ATen/oneDNN on CPU)")
    register("script", {cell: functools.partial(ScriptStack, cell) for cell in CELLS},
             description="TorchScript-compiled time loop, input projection as one GEMM")
    register("triton", {cell: functools.partial(triton_backend.TritonStack, cell) for cell in triton_backend.CELLS},
             probe=triton_backend.probe, variants=triton_backend.VARIANTS,
             description="hand-written Triton kernels, one fused launch per step or one persistent launch per layer "
                         "(variant; interpreted without CUDA)")
    register("compile",
             {cell: functools.partial(compile_backend.CompileStack, cell) for cell in compile_backend.CELLS},
             probe=compile_backend.probe,
             description="torch.compile of the reference cell step (benchmark peer; slow first call)")


_register_builtin_backends()
