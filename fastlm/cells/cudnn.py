"""The cudnn backend: torch.nn.LSTM / GRU / RNN (cuDNN on GPU, ATen/oneDNN kernels on CPU).

torch.nn modules already own their parameters under the canonical names and return ``(y, state)`` in the
shape the interface asks for, so this backend is torch.nn plus the shared bookkeeping attributes.
"""

import torch
from torch import nn

from fastlm.cells.base import RecurrentStack


def runs_on_cudnn(output: torch.Tensor) -> bool | None:
    """Whether torch.nn computed this recurrent ``output`` with cuDNN, read from the autograd record it left
    (cuDNN's is CudnnRnnBackward0); None off CUDA, or without an autograd record (no_grad) to tell. torch falls
    back to its own CUDA loop for what cuDNN does not take (bf16 before cuDNN 9.13 or on older GPUs), so a
    bf16 "cudnn" row need not be cuDNN's: reports say which it was."""
    if not output.is_cuda or output.grad_fn is None:
        return None
    return type(output.grad_fn).__name__.startswith("CudnnRnn")


class _CudnnMixin:
    backend = "cudnn"
    zero_state = RecurrentStack.zero_state


def _make(cell: str, torch_class, **fixed):
    class Stack(_CudnnMixin, torch_class):
        def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
            # torch.nn warns about dropout with one layer although it is a no-op there; pass 0 instead.
            super().__init__(input_size, hidden_size, num_layers,
                             dropout=float(dropout) if num_layers > 1 else 0.0, **fixed)
            self.cell = cell

    Stack.__name__ = Stack.__qualname__ = f"Cudnn{cell.upper()}"
    return Stack


CUDNN_STACKS = {
    "lstm": _make("lstm", nn.LSTM),
    "gru": _make("gru", nn.GRU),
    "rnn_tanh": _make("rnn_tanh", nn.RNN, nonlinearity="tanh"),
    "rnn_relu": _make("rnn_relu", nn.RNN, nonlinearity="relu"),
}
