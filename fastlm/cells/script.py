"""The script backend: the time loop of each layer compiled with TorchScript (torch.jit.script).

Per layer, the input projection of all T steps is one GEMM (F.linear over [T, B, E]); the scripted loop
then runs ``addmm`` for the recurrent projection and the shared cell math (fastlm.cells.math) per step.
TorchScript runs the loop without the Python interpreter and, on GPU, fuses the pointwise gate math;
autograd differentiates the scripted graph. It is the classic "fast custom RNN in PyTorch" recipe.

Recent torch deprecates TorchScript and warns when a function is scripted. The functions are scripted once
per process, on first use, with that one warning silenced locally, so users never see it; the rest of
the program's warning filters are untouched.
"""

import functools
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.cells.base import LayerwiseStack
from fastlm.cells.math import gru_pointwise, lstm_pointwise, rnn_relu_pointwise, rnn_tanh_pointwise

# The step of each cell as a tiny module: TorchScript takes no function as an argument, but it compiles a
# module's submodules, so one scripted time loop (_TimeLoop) serves every cell. Each one applies the cell's
# math from fastlm.cells.math: (gi_t, gh, h, c) -> (h_new, c_new or None).

class _LSTMStep(nn.Module):
    def forward(self, gi: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        assert c is not None
        return lstm_pointwise(gi, gh, c)


class _GRUStep(nn.Module):
    def forward(self, gi: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        return gru_pointwise(gi, gh, h), c


class _TanhStep(nn.Module):
    def forward(self, gi: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        return rnn_tanh_pointwise(gi, gh), c


class _ReluStep(nn.Module):
    def forward(self, gi: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        return rnn_relu_pointwise(gi, gh), c


_STEPS = {"lstm": _LSTMStep, "gru": _GRUStep, "rnn_tanh": _TanhStep, "rnn_relu": _ReluStep}


class _TimeLoop(nn.Module):
    """(gi [T, B, G*H] input projections with b_ih, h [B, H], c [B, H] or None, w_hh, b_hh)
    -> (y [T, B, H], h_T, c_T or None)."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, gi: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor,
                b_hh: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        outputs: List[Tensor] = []
        for t in range(gi.size(0)):
            h, c = self.step(gi[t], torch.addmm(b_hh, h, w_hh.t()), h, c)
            outputs.append(h)
        return torch.stack(outputs), h, c


@functools.cache
def scripted_loop(cell: str):
    """The TorchScript-compiled time loop of ``cell``, compiled once per process."""
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates torch.jit.script; this backend uses it on purpose (see module doc).
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        return torch.jit.script(_TimeLoop(_STEPS[cell]()))


class ScriptStack(LayerwiseStack):
    backend = "script"

    def run_layer(self, layer: int, x: Tensor, h0: Tensor, c0):
        w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
        gi = F.linear(x, w_ih, b_ih)  # all T input projections as one GEMM
        return scripted_loop(self.cell)(gi, h0, c0, w_hh, b_hh)
