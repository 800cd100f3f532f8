"""The triton backend: hand-written Triton kernels (fastlm.kernels) behind torch.autograd.Function.

Per layer and sequence (see kernels/lstm.py and kernels/gru.py for shapes, layouts and saved tensors):
forward = one GEMM for the input projection of all T steps + the time loop; backward = the time loop in
reverse + the weight gradients as single GEMMs over all T*B rows. The time loop comes in two variants with
the same math, parameter layout and autograd wrapper:
- "per-step": T fused step kernels (recurrent GEMM + gate math, h_t written straight into the output; in
  backward the recurrent dh GEMM + gate-gradient math). Every launch of a sequence passes the same
  whole-sequence tensors and the step index t, bound once per layer call, so a launch costs Triton's
  launcher and no tensor slicing.
- "persistent": one launch per layer and direction walks all T steps (kernels/persistent_lstm.py,
  kernels/persistent_gru.py); its programs each own some hidden units and exchange h (dL/dpre backward)
  through global memory behind a grid barrier (kernels/grid_barrier.py), which is valid only while all of
  them are resident at once. Under the Triton interpreter it runs as one program, without a barrier.

Choosing: ``TritonStack(..., variant=...)`` or ``cells.build(..., variant=...)`` with one of VARIANTS,
decided again at each call from the shape and the machine (``choose_variant``):
- "per-step": per-step.
- "persistent": persistent wherever it can run: always under the interpreter (single program); compiled,
  when its grid is co-resident (at most one program per SM, and one program's registers and shared memory
  fit an SM, read from the compiled kernel), else per-step, with the reason recorded.
- "auto" (the default): per-step under the interpreter (which runs programs one after another: one launch
  saves nothing there); compiled on CUDA, persistent when B <= AUTO_MAX_BATCH (64) and H <= AUTO_MAX_HIDDEN
  (1024), where per-step launches cost as much as a step's arithmetic, and the grid is co-resident; else
  per-step. Nothing has been measured on a GPU yet: this is the expectation, to be revisited with numbers.
  H <= 1024 also keeps the grid at 64 programs or fewer, half an H100's SMs, leaving room for kernels on
  other streams (NCCL's, in data-parallel training), which can delay a persistent launch's start.
A call decides once for all its layers and both directions; the co-residency verdict (which compiles the
persistent kernels without launching them, to read their registers and shared memory) is remembered per
shape, dtype, TF32 flag and device, so CUDA-graph capture after an eager warm-up compiles nothing.
``TritonStack.variant`` is what the last call ran ("per-step" or "persistent"; before any call, what is
expected), ``variant_reason`` says why, and ``launch_configs()`` gives each kernel's variant, tiles, grid
and (persistent, compiled) its registers and shared memory: what a benchmark row records.

Tiles (fastlm.cells.triton_tiles): compiled, each of the per-step forward and backward kernels gets the
tiles that ran fastest when timed once per (kernel, B, H, dtype, TF32) on this GPU, remembered on disk; a
heuristic default under CUDA graph capture or with FASTLM_TRITON_TUNE=0; ``TritonStack.launch_config``
overrides both (and gives the persistent kernels their tiles). The persistent kernels use a fixed,
documented rule (``persistent_config``). fp32 GEMM tiles use TF32 when torch.backends.cuda.matmul.allow_tf32
is set, read at every call. Sigmoid and tanh are as accurate as torch's (libdevice, IEEE division;
kernels/common.py has the error argument).

Without CUDA the kernels run through Triton's interpreter on CPU tensors. Triton decides between compiling
and interpreting when a function is decorated, its own library included, so TRITON_INTERPRET=1 must be
set before triton is first imported. Importing this module sets nothing: on a machine without CUDA
``choose_interpreter`` sets it when the backend is first built, or before fastlm code imports torch._dynamo
(which imports triton); if triton was loaded before that, the first build says what to do.
The interpreted mode is announced once in the log; it is slow and exists for correctness checks and
CPU-only machines. It uses the fewest, largest tiles and never TF32.
Inputs, state and parameters must share one device and one dtype: fp32, fp16, or bf16 (not interpreted).
"""

import contextlib
import functools
import importlib.util
import logging
import os
import sys
from dataclasses import asdict
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.cells.base import LayerwiseStack
from fastlm.cells.triton_tiles import (
    Choice,
    LaunchConfig,
    PersistentConfig,
    TileKey,
    TileTuner,
    persistent_config,
    time_launch,
)
from fastlm.errors import FastlmError, first_line

log = logging.getLogger(__name__)

VARIANTS = ("per-step", "persistent", "auto")
AUTO_MAX_BATCH = 64  # "auto" picks the persistent kernels up to this batch size ...
AUTO_MAX_HIDDEN = 1024  # ... and this hidden size (see the module docstring)
GATES = {"lstm": 4, "gru": 3}

def choose_interpreter() -> None:
    """Without CUDA the kernels can only run through Triton's interpreter, and Triton reads TRITON_INTERPRET when
    it is imported (see the module docstring): so it is set here, while triton is not loaded yet. Called where
    the backend is built (``kernels``) and, earlier, by fastlm code about to import torch._dynamo (the compile
    backend, the example step's compile baseline), which imports triton: after that the choice is made."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def probe() -> Optional[str]:
    """None when the triton backend can run here; else why not. Cheap: does not import triton."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux x86_64 only)"
    if not torch.cuda.is_available() and importlib.util.find_spec("numpy") is None:
        return "no CUDA device, and running the kernels through the Triton interpreter needs numpy"
    return None


@functools.cache
def kernels() -> SimpleNamespace:
    """The kernel modules, imported once, compiled for CUDA or interpreted (no CUDA): .lstm, .gru,
    .grid_barrier, .interpreted; .scratch (kernel name -> the scratch launch the tile tuner times);
    .steps ((cell, variant) -> the forward and backward time-loop functions the layer functions take);
    .compiled_persistent (cell -> compiles that cell's persistent kernels for the co-residency check)."""
    choose_interpreter()
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # Imports triton: decided compiled or interpreted by now.
    from fastlm.kernels import grid_barrier, gru, lstm, persistent_gru, persistent_lstm

    interpreted = isinstance(lstm.lstm_forward_step, InterpretedFunction)
    if not torch.cuda.is_available() and not (interpreted and isinstance(tl.zeros, InterpretedFunction)):
        raise FastlmError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                          "machine without CUDA; set TRITON_INTERPRET=1 in the environment (or build the triton "
                          "backend before anything that imports triton, such as torch.compile)")
    scratch = {"lstm_forward": lstm.lstm_forward_scratch, "lstm_backward": lstm.lstm_backward_scratch,
               "gru_forward": gru.gru_forward_scratch, "gru_backward": gru.gru_backward_scratch}
    steps = {
        ("lstm", "per-step"): (lstm.lstm_forward_steps, lstm.lstm_backward_steps),
        ("lstm", "persistent"): (persistent_lstm.lstm_forward_persistent_steps,
                                 persistent_lstm.lstm_backward_persistent_steps),
        ("gru", "per-step"): (gru.gru_forward_steps, gru.gru_backward_steps),
        ("gru", "persistent"): (persistent_gru.gru_forward_persistent_steps,
                                persistent_gru.gru_backward_persistent_steps),
    }
    compiled_persistent = {"lstm": persistent_lstm.lstm_persistent_compiled,
                           "gru": persistent_gru.gru_persistent_compiled}
    return SimpleNamespace(lstm=lstm, gru=gru, grid_barrier=grid_barrier, interpreted=interpreted, scratch=scratch,
                           steps=steps, compiled_persistent=compiled_persistent)


TUNER = TileTuner()  # one per process: every stack shares what was tuned


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
    limits = kernels().grid_barrier.device_limits(device.index)
    key = (cell, config, batch, hidden, dtype, tf32, device.index, tuple(sorted(limits.items())))
    if key not in _RESIDENCY:
        _RESIDENCY[key] = _check_residency(cell, config, batch, hidden, dtype, tf32, device, limits)
    return _RESIDENCY[key]


def _check_residency(cell, config, batch, hidden, dtype, tf32, device, limits) -> tuple[Optional[str], dict]:
    from triton.runtime.errors import OutOfResources

    barrier = kernels().grid_barrier
    reason = barrier.grid_reason(config.programs, limits)
    if reason is not None:
        return reason, {}
    try:
        compiled = kernels().compiled_persistent[cell](batch, hidden, dtype, device, config, tf32)
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
        launch = kernels().scratch[key.kernel](key.batch, key.hidden, getattr(torch, key.dtype), device, config,
                                               key.allow_tf32)
        return time_launch(launch)

    return measure


class _LSTMLayer(torch.autograd.Function):
    """(x, h0, c0, W_ih, W_hh, b_ih, b_hh) -> (y, h_n, c_n) for one layer; saves x, h0, c0, the weights,
    y, every c_t (fp32) and the activated gates [T, B, 4H]."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch):
        y, cs, gates = kernels().lstm.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch.forward, save=True)
        ctx.launch = launch
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cs, gates)
        return y, y[-1].clone(), cs[-1].to(x.dtype, copy=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, y, cs, gates = ctx.saved_tensors
        grads = kernels().lstm.lstm_layer_backward(x, h0, c0, w_ih, w_hh, y, cs, gates, dy, dh_n, dc_n,
                                                   ctx.launch.backward)
        return (*grads, None)


class _GRULayer(torch.autograd.Function):
    """(x, h0, W_ih, W_hh, b_ih, b_hh) -> (y, h_n) for one layer; saves x, h0, the weights, y and
    r, z, n, gh_n [T, B, 4H]."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, launch):
        y, saved = kernels().gru.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, launch.forward, save=True)
        ctx.launch = launch
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, saved)
        return y, y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, w_ih, w_hh, y, saved = ctx.saved_tensors
        grads = kernels().gru.gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, dh_n, ctx.launch.backward)
        return (*grads, None)


@functools.cache
def _announce(interpreted: bool) -> None:
    """Say once per process how the kernels run."""
    if interpreted:
        log.warning("triton backend: kernels running through the Triton interpreter (TRITON_INTERPRET=1, set "
                    "because this machine has no CUDA device): correct but slow")
    else:
        log.info("triton backend: kernels compiled for CUDA")


class TritonStack(LayerwiseStack):
    """LSTM or GRU stack on the Triton kernels.

    ``variant``: "per-step", "persistent" or "auto" (default), see the module docstring; kept as
    ``requested_variant``, while ``variant`` and ``variant_reason`` say what the last call ran and why.
    ``launch_config``: None (default) lets fastlm.cells.triton_tiles choose each kernel's tiles (tuned on
    a GPU); kernel authors and tests may set a LaunchConfig to force the tiles of every kernel (the
    persistent ones too). ``launch_configs()`` reports what the last forward call used.
    """

    backend = "triton"

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 variant: str = "auto"):
        if variant not in VARIANTS:
            raise FastlmError(f"triton backend: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        super().__init__(cell, input_size, hidden_size, num_layers, dropout)
        self.interpreted = kernels().interpreted
        self.requested_variant = variant
        self.launch_config: Optional[LaunchConfig] = None
        self._choice: Optional[VariantChoice] = None
        self._records: dict[str, dict] = {}
        _announce(self.interpreted)

    @property
    def variant(self) -> str:
        """"per-step" or "persistent": what the last call ran; before any call, what is expected."""
        return self._choice.variant if self._choice is not None else self._expected()[0]

    @property
    def variant_reason(self) -> str:
        """Why ``variant`` runs, in words."""
        return self._choice.reason if self._choice is not None else self._expected()[1]

    def _expected(self) -> tuple[str, str]:
        variant, reason = choose_variant(self.requested_variant, self.interpreted, 1, self.hidden_size, lambda: None)
        return variant, f"{reason} (expected before the first call; decided at each call)"

    def describe(self) -> str:
        how = ("run by the Triton interpreter (TRITON_INTERPRET=1; slow, for correctness)" if self.interpreted
               else "compiled for CUDA")
        if self.variant == "persistent":
            loop = ("1 launch per layer forward and 1 backward, each walking all time steps (programs exchange h "
                    "through a grid barrier; one program under the interpreter)")
        else:
            loop = "1 fused kernel per time step forward and 1 backward"
        return (f"triton {self.cell} {self.variant}: {loop}, input projection and weight gradients as "
                f"whole-sequence GEMMs; {how} [{self.variant_reason}]")

    def launch_configs(self) -> dict:
        """Per kernel run by the last forward call ("lstm_forward", "lstm_backward", ...; backward only when a
        gradient was needed): "variant" and "variant_reason"; the tiles, the shape and TF32 flag they were
        chosen for, and their source: per-step "tuned" (timed in this process), "cached" (from the tile
        cache), "heuristic" or "override" (``launch_config``); persistent "fixed" (the documented rule) or
        "override", with "programs", "resident", "single_program" and, compiled with a grid barrier, the
        kernel's "registers" (per thread), "spills" and "shared_bytes". JSON-ready, for benchmark records."""
        return {kernel: dict(record) for kernel, record in self._records.items()}

    def forward(self, x: torch.Tensor, state=None):
        self._check(x, state)
        self._records = {}  # filled by this call's layers: a no-grad call runs no backward kernel
        # Triton launches on the current CUDA device: make it the inputs' one (e.g. a model on cuda:1).
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            self._choice = self._choose_variant(x)
            return super().forward(x, state)

    def _check(self, x: torch.Tensor, state) -> None:
        weight = self.weight_hh_l0
        tensors = [x] + ([] if state is None else list(state) if isinstance(state, (tuple, list)) else [state])
        for tensor in tensors:
            if tensor.device != weight.device or tensor.dtype != weight.dtype:
                raise FastlmError(f"triton backend: inputs and state must match the parameters' device and dtype "
                                  f"({weight.device}, {weight.dtype}); got {tensor.device}, {tensor.dtype}")
        if not self.interpreted and x.device.type != "cuda":
            raise FastlmError(f"triton backend: the kernels are compiled for CUDA; move the model and inputs to "
                              f"a CUDA device (got {x.device})")
        # The interpreter computes with numpy, which has no bfloat16.
        dtypes = (torch.float32, torch.float16) if self.interpreted else (torch.float32, torch.float16, torch.bfloat16)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise FastlmError(f"triton backend: dtype {x.dtype} is not supported here (supported: {names})")

    def _choose_variant(self, x: torch.Tensor) -> VariantChoice:
        """This call's variant (``choose_variant``), with the persistent config and, when checked, the
        persistent kernels' resources."""
        batch, dtype = x.shape[1], str(x.dtype).removeprefix("torch.")
        tf32 = allow_tf32(x.dtype, self.interpreted)
        config = persistent_config(batch, self.hidden_size, GATES[self.cell], dtype, tf32, self.interpreted,
                                   self.launch_config)
        checked = {}

        def why_not() -> Optional[str]:
            reason, checked["resources"] = residency(self.cell, config, batch, self.hidden_size, x.dtype, tf32,
                                                     x.device)
            return reason

        variant, reason = choose_variant(self.requested_variant, self.interpreted, batch, self.hidden_size, why_not)
        return VariantChoice(variant, reason, config if variant == "persistent" else None,
                             checked.get("resources", {}))

    def run_layer(self, layer: int, x: torch.Tensor, h0: torch.Tensor, c0):
        weights = tuple(w.contiguous() for w in self.layer_weights(layer))
        x, h0 = x.contiguous(), h0.contiguous()
        c0 = c0.contiguous() if c0 is not None else None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h0, c0) + weights)
        return _LAYER_RUNNERS[self.cell](x, h0, c0, weights, self._layer_launch(x, needs_grad), needs_grad)

    def _layer_launch(self, x: torch.Tensor, needs_grad: bool) -> LayerLaunch:
        """The time-loop functions of this call's variant, bound to their configs and the TF32 flag."""
        tf32 = allow_tf32(x.dtype, self.interpreted)
        forward_steps, backward_steps = kernels().steps[(self.cell, self._choice.variant)]
        directions = ("forward", "backward") if needs_grad else ("forward",)
        if self._choice.persistent is not None:
            configs = [self._record_persistent(direction, x, tf32) for direction in directions]
        else:
            configs = [self._choose(direction, x, tf32) for direction in directions]
        forward = functools.partial(forward_steps, config=configs[0], allow_tf32=tf32)
        backward = functools.partial(backward_steps, config=configs[1], allow_tf32=tf32) if needs_grad else None
        return LayerLaunch(forward, backward)

    def _key_fields(self, x: torch.Tensor, tf32: bool) -> dict:
        return {"batch": x.shape[1], "hidden": self.hidden_size, "dtype": str(x.dtype).removeprefix("torch."),
                "allow_tf32": tf32}

    def _choose(self, direction: str, x: torch.Tensor, tf32: bool) -> LaunchConfig:
        """The tiles of this cell's ``direction`` per-step kernel for x's shape; recorded for launch_configs()."""
        fields = self._key_fields(x, tf32)
        key = TileKey(f"{self.cell}_{direction}", fields["batch"], fields["hidden"], fields["dtype"], tf32)
        if self.launch_config is not None:
            choice = Choice(self.launch_config, "override")
        else:
            machine = "interpreter" if self.interpreted else _machine(x.device.index)
            choice = TUNER.choose(key, machine, _measure_on(key, x.device), self.interpreted)
        self._records[key.kernel] = {**asdict(choice.config), "source": choice.source, **fields,
                                     "variant": "per-step", "variant_reason": self._choice.reason}
        return choice.config

    def _record_persistent(self, direction: str, x: torch.Tensor, tf32: bool) -> PersistentConfig:
        """This call's PersistentConfig, recorded for launch_configs() under this cell's ``direction``."""
        kernel = f"{self.cell}_{direction}"
        config = self._choice.persistent
        self._records[kernel] = {**config.record(), "source": "fixed" if self.launch_config is None else "override",
                                 **self._key_fields(x, tf32), "variant": "persistent",
                                 "variant_reason": self._choice.reason, **self._choice.resources.get(kernel, {})}
        return config


def _run_lstm_layer(x, h0, c0, weights, launch, needs_grad):
    """(y, h_n, c_n) of one LSTM layer: through autograd when a gradient is needed, else the forward kernels
    alone (nothing saved)."""
    if needs_grad:
        return _LSTMLayer.apply(x, h0, c0, *weights, launch)
    y, cs, _ = kernels().lstm.lstm_layer_forward(x, h0, c0, *weights, launch.forward, save=False)
    return y, y[-1], cs[-1].to(x.dtype)


def _run_gru_layer(x, h0, c0, weights, launch, needs_grad):
    """(y, h_n, None) of one GRU layer, as _run_lstm_layer."""
    if needs_grad:
        y, h_n = _GRULayer.apply(x, h0, *weights, launch)
        return y, h_n, None
    y, _ = kernels().gru.gru_layer_forward(x, h0, *weights, launch.forward, save=False)
    return y, y[-1], None


_LAYER_RUNNERS = {"lstm": _run_lstm_layer, "gru": _run_gru_layer}
CELLS = tuple(_LAYER_RUNNERS)  # the cells these kernels implement
