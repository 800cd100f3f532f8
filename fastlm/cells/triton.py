"""The triton backend: hand-written Triton step kernels (fastlm.kernels) behind torch.autograd.Function.

Per layer and sequence (see kernels/lstm.py and kernels/gru.py for shapes, layouts and saved tensors):
forward = one GEMM for the input projection of all T steps + T fused step kernels (recurrent GEMM + gate
math, h_t written straight into the output); backward = T fused step kernels walking time in reverse
(recurrent dh GEMM + gate-gradient math) + the weight gradients as single GEMMs over all T*B rows. Every
launch of a sequence passes the same whole-sequence tensors and the step index t, bound once per layer
call, so a launch costs Triton's launcher and no tensor slicing.

Variant: "per-step" (one launch per time step). The persistent variant (the whole sequence in one launch,
blocks exchanging h through a grid-wide barrier) is not implemented; ``describe()`` says which runs.

Tiles (fastlm.cells.triton_tiles): compiled, each of the forward and backward step kernels gets the tiles
that ran fastest when timed once per (kernel, B, H, dtype, TF32) on this GPU, remembered on disk; a
heuristic default under CUDA graph capture or with FASTLM_TRITON_TUNE=0; ``TritonStack.launch_config``
overrides both; ``TritonStack.launch_configs()`` says what the last call ran with. fp32 GEMM tiles use
TF32 when torch.backends.cuda.matmul.allow_tf32 is set, read at every call. Sigmoid and tanh are as
accurate as torch's (libdevice, IEEE division; kernels/common.py has the error argument).

Without CUDA the kernels run through Triton's interpreter on CPU tensors. Triton decides between compiling
and interpreting when a function is decorated, its own library included, so TRITON_INTERPRET=1 must be
set before triton is first imported: importing this module (which ``import fastlm.cells`` does) sets it
on machines without CUDA, unless triton is already loaded, in which case the first build says what to do.
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
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.cells.base import LayerwiseStack
from fastlm.cells.triton_tiles import Choice, LaunchConfig, TileKey, TileTuner, time_launch
from fastlm.errors import FastlmError

log = logging.getLogger(__name__)

VARIANT = "per-step"

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # compiled kernels cannot run without CUDA (see module doc)


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
    .interpreted, and .scratch (kernel name -> the scratch launch the tile tuner times)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import gru, lstm  # imports triton: decided compiled or interpreted by now

    interpreted = isinstance(lstm.lstm_forward_step, InterpretedFunction)
    if not torch.cuda.is_available() and not (interpreted and isinstance(tl.zeros, InterpretedFunction)):
        raise FastlmError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                          "machine without CUDA; set TRITON_INTERPRET=1 in the environment (or import fastlm.cells "
                          "before anything that imports triton)")
    scratch = {"lstm_forward": lstm.lstm_forward_scratch, "lstm_backward": lstm.lstm_backward_scratch,
               "gru_forward": gru.gru_forward_scratch, "gru_backward": gru.gru_backward_scratch}
    return SimpleNamespace(lstm=lstm, gru=gru, interpreted=interpreted, scratch=scratch)


TUNER = TileTuner()  # one per process: every stack shares what was tuned


class LayerLaunch(NamedTuple):
    """How one layer call launches its step kernels: the forward and backward tiles (backward None when no
    gradient is needed) and whether fp32 GEMM tiles may use TF32."""

    forward: LaunchConfig
    backward: Optional[LaunchConfig]
    allow_tf32: bool


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
        y, cs, gates = kernels().lstm.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch.forward,
                                                         launch.allow_tf32, save=True)
        ctx.launch = launch
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cs, gates)
        return y, y[-1].clone(), cs[-1].to(x.dtype, copy=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, y, cs, gates = ctx.saved_tensors
        grads = kernels().lstm.lstm_layer_backward(x, h0, c0, w_ih, w_hh, y, cs, gates, dy, dh_n, dc_n,
                                                   ctx.launch.backward, ctx.launch.allow_tf32)
        return (*grads, None)


class _GRULayer(torch.autograd.Function):
    """(x, h0, W_ih, W_hh, b_ih, b_hh) -> (y, h_n) for one layer; saves x, h0, the weights, y and
    r, z, n, gh_n [T, B, 4H]."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, launch):
        y, saved = kernels().gru.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, launch.forward, launch.allow_tf32,
                                                   save=True)
        ctx.launch = launch
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, saved)
        return y, y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, w_ih, w_hh, y, saved = ctx.saved_tensors
        grads = kernels().gru.gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, dh_n, ctx.launch.backward,
                                                 ctx.launch.allow_tf32)
        return (*grads, None)


@functools.cache
def _announce(interpreted: bool) -> None:
    """Say once per process which variant runs and how."""
    if interpreted:
        log.warning("triton backend: %s kernels running through the Triton interpreter (TRITON_INTERPRET=1, "
                    "set because this machine has no CUDA device): correct but slow", VARIANT)
    else:
        log.info("triton backend: %s kernels compiled for CUDA", VARIANT)


class TritonStack(LayerwiseStack):
    """LSTM or GRU stack on the Triton kernels.

    ``launch_config``: None (default) lets fastlm.cells.triton_tiles choose each kernel's tiles (tuned on
    a GPU); kernel authors and tests may set a LaunchConfig to force the tiles of every step kernel.
    ``launch_configs()`` reports what the last forward call used.
    """

    backend = "triton"
    variant = VARIANT

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__(cell, input_size, hidden_size, num_layers, dropout)
        self.interpreted = kernels().interpreted
        self.launch_config: Optional[LaunchConfig] = None
        self._last_choices: dict[str, tuple[TileKey, Choice]] = {}
        _announce(self.interpreted)

    def describe(self) -> str:
        how = ("run by the Triton interpreter (TRITON_INTERPRET=1; slow, for correctness)" if self.interpreted
               else "compiled for CUDA")
        return (f"triton {self.cell} {self.variant}: 1 fused kernel per time step forward and 1 backward, "
                f"input projection and weight gradients as whole-sequence GEMMs; {how}")

    def launch_configs(self) -> dict:
        """Per step kernel run by the last forward call ("lstm_forward", "lstm_backward", ...; backward only
        when a gradient was needed): its tiles, the shape and TF32 flag they were chosen for, and their
        source: "tuned" (timed in this process), "cached" (from the tile cache), "heuristic" or "override"
        (``launch_config``). JSON-ready, for benchmark records."""
        return {kernel: {**asdict(choice.config), "source": choice.source, "batch": key.batch, "hidden": key.hidden,
                         "dtype": key.dtype, "allow_tf32": key.allow_tf32}
                for kernel, (key, choice) in self._last_choices.items()}

    def forward(self, x: torch.Tensor, state=None):
        self._check(x, state)
        self._last_choices = {}  # filled by this call's layers: a no-grad call runs no backward kernel
        # Triton launches on the current CUDA device: make it the inputs' one (e.g. a model on cuda:1).
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
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

    def run_layer(self, layer: int, x: torch.Tensor, h0: torch.Tensor, c0):
        weights = tuple(w.contiguous() for w in self.layer_weights(layer))
        x, h0 = x.contiguous(), h0.contiguous()
        c0 = c0.contiguous() if c0 is not None else None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h0, c0) + weights)
        return _LAYER_RUNNERS[self.cell](x, h0, c0, weights, self._layer_launch(x, needs_grad), needs_grad)

    def _layer_launch(self, x: torch.Tensor, needs_grad: bool) -> LayerLaunch:
        tf32 = allow_tf32(x.dtype, self.interpreted)
        forward = self._choose("forward", x, tf32)
        return LayerLaunch(forward, self._choose("backward", x, tf32) if needs_grad else None, tf32)

    def _choose(self, direction: str, x: torch.Tensor, tf32: bool) -> LaunchConfig:
        """The tiles of this cell's ``direction`` step kernel for x's shape; remembered for launch_configs()."""
        key = TileKey(f"{self.cell}_{direction}", x.shape[1], self.hidden_size, str(x.dtype).removeprefix("torch."),
                      tf32)
        if self.launch_config is not None:
            choice = Choice(self.launch_config, "override")
        else:
            machine = "interpreter" if self.interpreted else _machine(x.device.index)
            choice = TUNER.choose(key, machine, _measure_on(key, x.device), self.interpreted)
        self._last_choices[key.kernel] = (key, choice)
        return choice.config


def _run_lstm_layer(x, h0, c0, weights, launch, needs_grad):
    """(y, h_n, c_n) of one LSTM layer: through autograd when a gradient is needed, else the forward kernels
    alone (nothing saved)."""
    if needs_grad:
        return _LSTMLayer.apply(x, h0, c0, *weights, launch)
    y, cs, _ = kernels().lstm.lstm_layer_forward(x, h0, c0, *weights, launch.forward, launch.allow_tf32, save=False)
    return y, y[-1], cs[-1].to(x.dtype)


def _run_gru_layer(x, h0, c0, weights, launch, needs_grad):
    """(y, h_n, None) of one GRU layer, as _run_lstm_layer."""
    if needs_grad:
        y, h_n = _GRULayer.apply(x, h0, *weights, launch)
        return y, h_n, None
    y, _ = kernels().gru.gru_layer_forward(x, h0, *weights, launch.forward, launch.allow_tf32, save=False)
    return y, y[-1], None


_LAYER_RUNNERS = {"lstm": _run_lstm_layer, "gru": _run_gru_layer}
CELLS = tuple(_LAYER_RUNNERS)  # the cells these kernels implement
