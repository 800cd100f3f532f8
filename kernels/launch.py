"""How a layer call of the Triton kernels runs: compiled or interpreted, which variant, which tiles.

fastlm.kernels.gru and lstm (kernels/gru_layer.py, kernels/lstm_layer.py) ask ``plan_layer`` for each call's
time loops. Triton fixes compiled or interpreted when a function is decorated, its own library included, so
TRITON_INTERPRET=1 must be set before triton is first imported: fastlm.kernels.choose_interpreter sets it,
without CUDA, where the kernels are first loaded (``kernel_modules``) or before fastlm code imports
torch._dynamo (which imports triton); if triton was loaded earlier, the first load says what to do.
Interpreted (slow; announced once in the log): fewest, largest tiles, never TF32, numpy, so no bf16.
Variants (``choose_variant``), per call: "per-step", T step kernels (kernels/<cell>_step.py); "persistent",
one launch per layer and direction (kernels/<cell>_persistent.py), always when interpreted (one program),
compiled when the grid is co-resident, else per-step with the reason recorded; "auto" (default), persistent
when compiled, B <= AUTO_MAX_BATCH, H <= AUTO_MAX_HIDDEN and co-resident, else per-step. Co-residency verdicts
(compiled, not launched) are kept per shape, dtype, TF32 flag and device, so CUDA-graph capture after an eager
warm-up compiles nothing. Tiles: fastlm.kernels.tiles (``tiles=`` overrides); fp32 tiles use TF32 when
torch.backends.cuda.matmul.allow_tf32 is set, read at every call.
"""

import contextlib
import functools
import logging
from dataclasses import asdict
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import torch

from fastlm.config import VARIANTS
from fastlm.errors import FastlmError, first_line
from fastlm.kernels import choose_interpreter
from fastlm.kernels.tiles import (
    Choice,
    LaunchConfig,
    PersistentConfig,
    TileKey,
    TileTuner,
    persistent_config,
    time_launch,
)

log = logging.getLogger(__name__)

# Where "auto" picks the persistent kernels (compiled only: the interpreter runs programs one after another, so
# one launch per sequence saves nothing there). At these sizes per-step launches are expected to cost as much as
# a step's arithmetic. H <= 1024 also keeps the grid at 64 programs or fewer, half an H100's SMs, leaving room
# for kernels on other streams (NCCL's, in data-parallel training).
AUTO_MAX_BATCH = 64  # "auto" picks the persistent kernels up to this batch size ...
AUTO_MAX_HIDDEN = 1024  # ... and this hidden size
GATES = {"lstm": 4, "gru": 3}


@functools.cache
def kernel_modules() -> SimpleNamespace:
    """The Triton kernel modules, imported once, compiled for CUDA or interpreted (no CUDA): .lstm_step,
    .gru_step, .grid_barrier, .interpreted; .scratch (kernel name -> the scratch launch the tile tuner times);
    .steps ((cell, variant) -> the forward and backward time loops the layer functions take);
    .compiled_persistent (cell -> compiles that cell's persistent kernels for the co-residency check).
    Says once, in the log, how the kernels run."""
    choose_interpreter()
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # Imports triton: decided compiled or interpreted by now.
    from fastlm.kernels import grid_barrier, gru_persistent, gru_step, lstm_persistent, lstm_step

    interpreted = isinstance(lstm_step.lstm_forward_step, InterpretedFunction)
    if not torch.cuda.is_available() and not (interpreted and isinstance(tl.zeros, InterpretedFunction)):
        raise FastlmError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                          "machine without CUDA; set TRITON_INTERPRET=1 in the environment (or build the triton "
                          "backend before anything that imports triton, such as torch.compile)")
    if interpreted:
        log.warning("triton backend: kernels running through the Triton interpreter (TRITON_INTERPRET=1, set "
                    "because this machine has no CUDA device): correct but slow")
    else:
        log.info("triton backend: kernels compiled for CUDA")
    scratch = {"lstm_forward": lstm_step.lstm_forward_scratch, "lstm_backward": lstm_step.lstm_backward_scratch,
               "gru_forward": gru_step.gru_forward_scratch, "gru_backward": gru_step.gru_backward_scratch}
    steps = {
        ("lstm", "per-step"): (lstm_step.lstm_forward_steps, lstm_step.lstm_backward_steps),
        ("lstm", "persistent"): (lstm_persistent.lstm_forward_persistent_steps,
                                 lstm_persistent.lstm_backward_persistent_steps),
        ("gru", "per-step"): (gru_step.gru_forward_steps, gru_step.gru_backward_steps),
        ("gru", "persistent"): (gru_persistent.gru_forward_persistent_steps,
                                gru_persistent.gru_backward_persistent_steps),
    }
    compiled_persistent = {"lstm": lstm_persistent.lstm_persistent_compiled,
                           "gru": gru_persistent.gru_persistent_compiled}
    return SimpleNamespace(lstm_step=lstm_step, gru_step=gru_step, grid_barrier=grid_barrier, interpreted=interpreted,
                           scratch=scratch, steps=steps, compiled_persistent=compiled_persistent)


def check_variant(variant: str) -> None:
    """FastlmError unless ``variant`` is one of VARIANTS."""
    if variant not in VARIANTS:
        raise FastlmError(f"triton kernels: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def check_tensors(tensors, weight: torch.Tensor, interpreted: bool) -> None:
    """FastlmError unless every tensor has ``weight``'s device and dtype, a device the kernels run on (CUDA
    compiled; the CPU interpreted) and a dtype they take (fp32, fp16, bf16; not bf16 interpreted)."""
    for tensor in tensors:
        if tensor.device != weight.device or tensor.dtype != weight.dtype:
            raise FastlmError(f"triton kernels: inputs and state must match the parameters' device and dtype "
                              f"({weight.device}, {weight.dtype}); got {tensor.device}, {tensor.dtype}")
    if not interpreted and weight.device.type != "cuda":
        raise FastlmError(f"triton kernels: the kernels are compiled for CUDA; move the model and inputs to "
                          f"a CUDA device (got {weight.device})")
    # The interpreter computes with numpy, which has no bfloat16.
    dtypes = (torch.float32, torch.float16) if interpreted else (torch.float32, torch.float16, torch.bfloat16)
    if weight.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FastlmError(f"triton kernels: dtype {weight.dtype} is not supported here (supported: {names})")


def on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: a context making it x's (e.g. a model on cuda:1)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


TUNER = TileTuner()  # one per process: every call shares what was tuned


class LayerLaunch(NamedTuple):
    """How one layer call runs its time loops: the forward and backward functions the layer functions take,
    with their variant's config and the TF32 flag bound (backward None when no gradient is needed)."""

    forward: Callable
    backward: Optional[Callable]


class VariantChoice(NamedTuple):
    """Which variant a call runs and why. persistent: the PersistentConfig when the persistent kernels run;
    resources: kernel name -> registers, spills, shared memory of its compiled persistent kernel (when checked)."""

    variant: str
    reason: str
    persistent: Optional[PersistentConfig]
    resources: dict


def choose_variant(requested: str, interpreted: bool, batch: int, hidden: int,
                   residency: Callable[[], Optional[str]]) -> tuple[str, str]:
    """(variant that runs, why) for a call: the rule in the module docstring. ``residency()`` says why the
    persistent grid cannot be co-resident (None when it can); called only where it decides."""
    if requested == "per-step":
        return "per-step", "per-step, as asked"
    if interpreted:
        if requested == "persistent":
            return "persistent", "persistent, as asked: one program under the Triton interpreter, no grid barrier"
        return "per-step", ("auto chose per-step: the Triton interpreter runs programs one after another, so one "
                            "launch per sequence saves nothing")
    if requested == "auto" and (batch > AUTO_MAX_BATCH or hidden > AUTO_MAX_HIDDEN):
        return "per-step", (f"auto chose per-step: B = {batch}, H = {hidden} is outside B <= {AUTO_MAX_BATCH}, "
                            f"H <= {AUTO_MAX_HIDDEN}, where the persistent kernels are expected to win")
    why_not = residency()
    if why_not is not None:
        return "per-step", f"{requested} fell back to per-step: the persistent grid cannot be co-resident: {why_not}"
    chose = "persistent, as asked" if requested == "persistent" else "auto chose persistent"
    return "persistent", f"{chose}: compiled for CUDA, every program of the grid resident at once"


_RESIDENCY: dict = {}  # the co-residency verdicts of this process, per shape, config and device


def residency(cell: str, config: PersistentConfig, batch: int, hidden: int, dtype: torch.dtype, tf32: bool,
              device: torch.device) -> tuple[Optional[str], dict]:
    """(why the persistent grid of ``config`` cannot be co-resident on ``device``, or None; {kernel name:
    resources}) for this cell and shape, compiled: the grid against the SM count first (nothing compiled when
    it is too large), then each persistent kernel's registers and shared memory (compiled, not launched).
    Remembered per process. A single program needs no barrier and no check."""
    if config.single_program:
        return None, {}
    limits = kernel_modules().grid_barrier.device_limits(device.index)
    key = (cell, config, batch, hidden, dtype, tf32, device.index, tuple(sorted(limits.items())))
    if key not in _RESIDENCY:
        _RESIDENCY[key] = _check_residency(cell, config, batch, hidden, dtype, tf32, device, limits)
    return _RESIDENCY[key]


def _check_residency(cell, config, batch, hidden, dtype, tf32, device, limits) -> tuple[Optional[str], dict]:
    from triton.runtime.errors import OutOfResources

    barrier = kernel_modules().grid_barrier
    reason = barrier.grid_reason(config.programs, limits)
    if reason is not None:
        return reason, {}
    try:
        compiled = kernel_modules().compiled_persistent[cell](batch, hidden, dtype, device, config, tf32)
        resources = {f"{cell}_{direction}": barrier.kernel_resources(kernel) for direction, kernel in compiled.items()}
    except OutOfResources as error:
        return f"one program does not fit an SM ({first_line(error)})", {}
    return barrier.coresidency_reason(config.programs, resources, limits), resources


def allow_tf32(dtype: torch.dtype, interpreted: bool) -> bool:
    """Whether the kernels' fp32 GEMM tiles may use TF32: torch's cuBLAS flag (which fastlm's precision
    setting sets), read at every call so a precision change between calls takes effect. Never for other
    dtypes, nor interpreted (CPU matmuls know no TF32, so the CPU reference would not either)."""
    return dtype == torch.float32 and not interpreted and bool(torch.backends.cuda.matmul.allow_tf32)


@functools.cache
def _machine(device_index: int) -> str:
    """What a tuned tile is valid for: the GPU's name and the triton version (the tile cache's file)."""
    import triton

    return f"{torch.cuda.get_device_name(device_index)}, triton {triton.__version__}"


def _measure_on(key: TileKey, device: torch.device):
    """measure(config) -> ms per launch of ``key``'s kernel with ``config`` on scratch buffers on ``device``."""
    def measure(config: LaunchConfig) -> float:
        launch = kernel_modules().scratch[key.kernel](key.batch, key.hidden, getattr(torch, key.dtype), device,
                                                      config, key.allow_tf32)
        return time_launch(launch)

    return measure


def decide_variant(cell: str, x: torch.Tensor, hidden: int, requested: str,
                   tiles: Optional[LaunchConfig]) -> VariantChoice:
    """The variant a call on x ([T, B, E]) runs (``choose_variant``), with the persistent config and, when
    checked, the persistent kernels' resources; ``tiles`` overrides the persistent tiles (as all others)."""
    interpreted = kernel_modules().interpreted
    batch, dtype = x.shape[1], str(x.dtype).removeprefix("torch.")
    tf32 = allow_tf32(x.dtype, interpreted)
    config = persistent_config(batch, hidden, GATES[cell], dtype, tf32, interpreted, tiles)
    checked = {}

    def why_not() -> Optional[str]:
        reason, checked["resources"] = residency(cell, config, batch, hidden, x.dtype, tf32, x.device)
        return reason

    variant, reason = choose_variant(requested, interpreted, batch, hidden, why_not)
    return VariantChoice(variant, reason, config if variant == "persistent" else None, checked.get("resources", {}))


def _per_step_tiles(key: TileKey, device: torch.device, tiles: Optional[LaunchConfig], interpreted: bool) -> Choice:
    """The tiles of ``key``'s per-step kernel: ``tiles`` when given ("override"), else the tuner's."""
    if tiles is not None:
        return Choice(tiles, "override")
    machine = "interpreter" if interpreted else _machine(device.index)
    return TUNER.choose(key, machine, _measure_on(key, device), interpreted)


def plan_layer(cell: str, x: torch.Tensor, hidden: int, requested: str, tiles: Optional[LaunchConfig],
               needs_grad: bool, ran: Optional[dict]) -> LayerLaunch:
    """The time loops of one layer call on x ([T, B, E]): the variant (``decide_variant``), each direction's
    tiles and the TF32 flag bound. ``ran``, when given, gets per kernel run ("gru_forward", "gru_backward", ...;
    backward only when ``needs_grad``): "variant" and "variant_reason"; the tiles, the shape and TF32 flag
    they were chosen for, and their source: per-step "tuned" (timed in this process), "cached" (from the tile
    cache), "heuristic" or "override" (``tiles``); persistent "fixed" (the documented rule) or "override",
    with "programs", "resident", "single_program" and, compiled with a grid barrier, the kernel's
    "registers" (per thread), "spills" and "shared_bytes". JSON-ready, for benchmark records."""
    interpreted = kernel_modules().interpreted
    choice = decide_variant(cell, x, hidden, requested, tiles)
    tf32 = allow_tf32(x.dtype, interpreted)
    fields = {"batch": x.shape[1], "hidden": hidden, "dtype": str(x.dtype).removeprefix("torch."), "allow_tf32": tf32}
    configs = []
    for direction in ("forward", "backward") if needs_grad else ("forward",):
        kernel = f"{cell}_{direction}"
        if choice.persistent is not None:
            config = choice.persistent
            record = {**config.record(), "source": "fixed" if tiles is None else "override", **fields,
                      "variant": "persistent", "variant_reason": choice.reason, **choice.resources.get(kernel, {})}
        else:
            chosen = _per_step_tiles(TileKey(kernel, fields["batch"], hidden, fields["dtype"], tf32), x.device, tiles,
                                     interpreted)
            config = chosen.config
            record = {**asdict(config), "source": chosen.source, **fields, "variant": "per-step",
                      "variant_reason": choice.reason}
        configs.append(config)
        if ran is not None:
            ran[kernel] = record
    forward_steps, backward_steps = kernel_modules().steps[(cell, choice.variant)]
    forward = functools.partial(forward_steps, config=configs[0], allow_tf32=tf32)
    backward = functools.partial(backward_steps, config=configs[1], allow_tf32=tf32) if needs_grad else None
    return LayerLaunch(forward, backward)
