"""Cell math in torch.nn's conventions, and the table every backend picks it from.

Gate order follows torch.nn: LSTM rows of ``weight_ih``/``weight_hh`` are [i, f, g, o], GRU rows are
[r, z, n]. ``gi`` is the input projection ``x @ W_ih^T + b_ih`` and ``gh`` the recurrent projection
``h @ W_hh^T + b_hh``; both are [B, G*H]. Keeping the projections outside the pointwise functions is what
lets a fused backend do all T input projections as one GEMM.

``CELL_MATH[cell]`` says how many gate blocks a cell has, whether it carries a cell state beside h (LSTM),
and its step ``(gi, gh, h, c) -> (h_new, c_new)`` (c is None for cells without one). The cells are the
ones fastlm.config.CELLS names.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm.config import CELLS


def lstm_pointwise(gi: torch.Tensor, gh: torch.Tensor, c: torch.Tensor):
    """LSTM gate math: returns (h_new, c_new) from the two projections and the old cell state."""
    i, f, g, o = (gi + gh).chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def gru_pointwise(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """GRU gate math: the reset gate scales the whole recurrent n-projection, bias included (torch.nn)."""
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_tanh_pointwise(gi: torch.Tensor, gh: torch.Tensor) -> torch.Tensor:
    return torch.tanh(gi + gh)


def rnn_relu_pointwise(gi: torch.Tensor, gh: torch.Tensor) -> torch.Tensor:
    return torch.relu(gi + gh)


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class CellMath:
    gates: int  # gate blocks: W_ih and W_hh have gates * H rows
    has_cell_state: bool  # the state is (h, c) rather than h
    step: Step  # (gi, gh, h, c) -> (h_new, c_new or None)


CELL_MATH = {
    "lstm": CellMath(4, True, lambda gi, gh, h, c: lstm_pointwise(gi, gh, c)),
    "gru": CellMath(3, False, lambda gi, gh, h, c: (gru_pointwise(gi, gh, h), None)),
    "rnn_tanh": CellMath(1, False, lambda gi, gh, h, c: (rnn_tanh_pointwise(gi, gh), None)),
    "rnn_relu": CellMath(1, False, lambda gi, gh, h, c: (rnn_relu_pointwise(gi, gh), None)),
}
assert tuple(CELL_MATH) == CELLS, "every cell fastlm.config names needs its math here, in the same order"
