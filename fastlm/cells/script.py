"""The script backend: the time loop of each layer compiled with TorchScript (torch.jit.script).

Per layer, the input projection of all T steps is one GEMM (F.linear over [T, B, E]); the scripted loop
then runs ``addmm`` for the recurrent projection and the shared cell math (fastlm.cells.math) per step.
TorchScript runs the loop without the Python interpreter and, on GPU, fuses the pointwise gate math;
autograd differentiates the scripted graph. It is the classic "fast custom RNN in PyTorch" recipe.

Recent torch deprecates TorchScript and warns when a function is scripted. The functions are scripted once
per process, on first use, with that one warning silenced locally, so users never see it; the rest of
the program's warning filters are untouched.

``LayerwiseStack`` is the multi-layer driver shared by the fused backends (script, triton): state
handling, one call per layer, and torch.nn's inter-layer dropout.
"""

import functools
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.cells.base import RecurrentStack
from fastlm.cells.math import gru_pointwise, lstm_pointwise, rnn_relu_pointwise, rnn_tanh_pointwise


class LayerwiseStack(RecurrentStack):
    """Runs ``run_layer`` for each layer; dropout on every layer's output but the last, in training only.

    ``run_layer(layer, x, h0, c0)`` takes x [T, B, E_layer] and h0, c0 [B, H] (c0 None unless LSTM) and
    returns (y [T, B, H], h_n [B, H], c_n [B, H] or None).
    """

    def run_layer(self, layer: int, x: Tensor, h0: Tensor, c0):
        raise NotImplementedError

    def forward(self, x: Tensor, state=None):
        if state is None:
            state = self.zero_state(x.shape[1], x)
        is_lstm = self.cell == "lstm"
        h0, c0 = state if is_lstm else (state, None)
        final_h, final_c = [], []
        for layer in range(self.num_layers):
            x, h_n, c_n = self.run_layer(layer, x, h0[layer], c0[layer] if is_lstm else None)
            final_h.append(h_n)
            final_c.append(c_n)
            if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
        h_n = torch.stack(final_h)
        return x, ((h_n, torch.stack(final_c)) if is_lstm else h_n)


def _lstm_loop(gi: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """gi [T, B, 4H] input projections (b_ih included); returns y [T, B, H], h_T, c_T."""
    outputs: List[Tensor] = []
    for t in range(gi.size(0)):
        h, c = lstm_pointwise(gi[t], torch.addmm(b_hh, h, w_hh.t()), c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def _gru_loop(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tuple[Tensor, Tensor]:
    """gi [T, B, 3H] input projections (b_ih included); returns y [T, B, H], h_T."""
    outputs: List[Tensor] = []
    for t in range(gi.size(0)):
        h = gru_pointwise(gi[t], torch.addmm(b_hh, h, w_hh.t()), h)
        outputs.append(h)
    return torch.stack(outputs), h


def _rnn_loop(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor, relu: bool) -> Tuple[Tensor, Tensor]:
    """gi [T, B, H] input projections (b_ih included); returns y [T, B, H], h_T."""
    outputs: List[Tensor] = []
    for t in range(gi.size(0)):
        gh = torch.addmm(b_hh, h, w_hh.t())
        h = rnn_relu_pointwise(gi[t], gh) if relu else rnn_tanh_pointwise(gi[t], gh)
        outputs.append(h)
    return torch.stack(outputs), h


_LOOPS = {"lstm": _lstm_loop, "gru": _gru_loop, "rnn_tanh": _rnn_loop, "rnn_relu": _rnn_loop}


@functools.cache
def scripted_loop(cell: str):
    """The TorchScript-compiled time loop of ``cell``, compiled once per process."""
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates torch.jit.script; this backend uses it on purpose (see module doc).
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        return torch.jit.script(_LOOPS[cell])


class ScriptStack(LayerwiseStack):
    backend = "script"

    def run_layer(self, layer: int, x: Tensor, h0: Tensor, c0):
        w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
        gi = F.linear(x, w_ih, b_ih)  # all T input projections as one GEMM
        loop = scripted_loop(self.cell)
        if self.cell == "lstm":
            return loop(gi, h0, c0, w_hh, b_hh)
        if self.cell == "gru":
            y, h_n = loop(gi, h0, w_hh, b_hh)
        else:
            y, h_n = loop(gi, h0, w_hh, b_hh, self.cell == "rnn_relu")
        return y, h_n, None
