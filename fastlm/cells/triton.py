"""The triton backend: hand-written Triton step kernels (fastlm.kernels) behind torch.autograd.Function.

Per layer and sequence (see kernels/lstm.py and kernels/gru.py for shapes, layouts and saved tensors):
forward = one GEMM for the input projection of all T steps + T fused step kernels (recurrent GEMM + gate
math, h_t written straight into the output); backward = T fused step kernels walking time in reverse
(recurrent dh GEMM + gate-gradient math) + the weight gradients as single GEMMs over all T*B rows.

Variant: "per-step" (one launch per time step). The persistent variant (the whole sequence in one launch,
blocks exchanging h through a grid-wide barrier) is not implemented; ``describe()`` says which runs.

Without CUDA the kernels run through Triton's interpreter on CPU tensors. Triton decides between compiling
and interpreting when a function is decorated, its own library included, so TRITON_INTERPRET=1 must be
set before triton is first imported: importing this module (which ``import fastlm.cells`` does) sets it
on machines without CUDA, unless triton is already loaded, in which case the first build says what to do.
The interpreted mode is announced once in the log; it is slow and exists for correctness checks and
CPU-only machines.
Inputs, state and parameters must share one device and one dtype: fp32, fp16, or bf16 (not interpreted).
"""

import contextlib
import functools
import importlib.util
import logging
import os
import sys
from types import SimpleNamespace
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.cells.base import LayerwiseStack
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
    .LaunchConfig and .interpreted."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import common, gru, lstm  # imports triton: decided compiled or interpreted by now

    interpreted = isinstance(lstm.lstm_forward_step, InterpretedFunction)
    if not torch.cuda.is_available() and not (interpreted and isinstance(tl.zeros, InterpretedFunction)):
        raise FastlmError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                          "machine without CUDA; set TRITON_INTERPRET=1 in the environment (or import fastlm.cells "
                          "before anything that imports triton)")
    return SimpleNamespace(lstm=lstm, gru=gru, LaunchConfig=common.LaunchConfig, interpreted=interpreted)


def _pow2(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, clamped to [low, high]."""
    return min(high, max(low, 1 << (n - 1).bit_length()))


def choose_launch_config(batch: int, hidden: int, dtype: torch.dtype):
    """Tile sizes for the step kernels at this shape (see kernels/common.py LaunchConfig)."""
    k = kernels()
    if k.interpreted:
        # The interpreter runs programs one after another in numpy: fewest, largest tiles are fastest.
        return k.LaunchConfig(_pow2(batch, 16, 128), _pow2(hidden, 16, 256), _pow2(hidden, 16, 256))
    # A step at these sizes is latency bound: small hidden tiles spread it over more SMs, while the batch
    # tile covers as many rows as possible so each W_hh tile is read from L2 by few programs.
    block_b = _pow2(batch, 16, 64)
    block_h = 32 if hidden >= 512 else 16
    block_k = 32 if dtype == torch.float32 else 64
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return k.LaunchConfig(block_b, block_h, block_k, num_warps=4, allow_tf32=tf32)


class _LSTMLayer(torch.autograd.Function):
    """(x, h0, c0, W_ih, W_hh, b_ih, b_hh) -> (y, h_n, c_n) for one layer; saves x, h0, c0, the weights,
    y, every c_t (fp32) and the activated gates [T, B, 4H]."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, config):
        y, cs, gates = kernels().lstm.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, config, save=True)
        ctx.config = config
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cs, gates)
        return y, y[-1].clone(), cs[-1].to(x.dtype, copy=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, y, cs, gates = ctx.saved_tensors
        grads = kernels().lstm.lstm_layer_backward(x, h0, c0, w_ih, w_hh, y, cs, gates, dy, dh_n, dc_n,
                                                   ctx.config)
        return (*grads, None)


class _GRULayer(torch.autograd.Function):
    """(x, h0, W_ih, W_hh, b_ih, b_hh) -> (y, h_n) for one layer; saves x, h0, the weights, y and
    r, z, n, gh_n [T, B, 4H]."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, config):
        y, saved = kernels().gru.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, config, save=True)
        ctx.config = config
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, saved)
        return y, y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, w_ih, w_hh, y, saved = ctx.saved_tensors
        return (*kernels().gru.gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, dh_n, ctx.config), None)


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

    ``launch_config``: None (default) picks tiles by shape with ``choose_launch_config``; kernel authors
    and tests may set a LaunchConfig to force tile sizes.
    """

    backend = "triton"
    variant = VARIANT

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__(cell, input_size, hidden_size, num_layers, dropout)
        self.interpreted = kernels().interpreted
        self.launch_config = None
        _announce(self.interpreted)

    def describe(self) -> str:
        how = ("run by the Triton interpreter (TRITON_INTERPRET=1; slow, for correctness)" if self.interpreted
               else "compiled for CUDA")
        return (f"triton {self.cell} {self.variant}: 1 fused kernel per time step forward and 1 backward, "
                f"input projection and weight gradients as whole-sequence GEMMs; {how}")

    def forward(self, x: torch.Tensor, state=None):
        self._check(x, state)
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
        config = self.launch_config or choose_launch_config(x.shape[1], self.hidden_size, x.dtype)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h0, c0) + weights)
        return _LAYER_RUNNERS[self.cell](x, h0, c0, weights, config, needs_grad)


def _run_lstm_layer(x, h0, c0, weights, config, needs_grad):
    """(y, h_n, c_n) of one LSTM layer: through autograd when a gradient is needed, else the forward kernels
    alone (nothing saved)."""
    if needs_grad:
        return _LSTMLayer.apply(x, h0, c0, *weights, config)
    y, cs, _ = kernels().lstm.lstm_layer_forward(x, h0, c0, *weights, config, save=False)
    return y, y[-1], cs[-1].to(x.dtype)


def _run_gru_layer(x, h0, c0, weights, config, needs_grad):
    """(y, h_n, None) of one GRU layer, as _run_lstm_layer."""
    if needs_grad:
        y, h_n = _GRULayer.apply(x, h0, *weights, config)
        return y, h_n, None
    y, _ = kernels().gru.gru_layer_forward(x, h0, *weights, config, save=False)
    return y, y[-1], None


_LAYER_RUNNERS = {"lstm": _run_lstm_layer, "gru": _run_gru_layer}
CELLS = tuple(_LAYER_RUNNERS)  # the cells these kernels implement
