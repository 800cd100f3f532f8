"""The one recurrent-stack interface every backend implements.

``y, state = layer(x, state)`` with x [T, B, E] and y [T, B, H]; the state is (h, c) for LSTM, each
[L, B, H], and h [L, B, H] otherwise; ``state=None`` means zeros. Every backend owns its parameters under
torch.nn's names (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``), so a
state_dict moves between backends unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.cells.math import CELL_MATH


class RecurrentStack(nn.Module):
    """Parameters in torch.nn layout, initialised as torch.nn does, plus the shared bookkeeping.

    Subclasses implement ``forward``. Parameters are created and initialised in the same order as
    torch.nn.LSTM/GRU/RNN so that, under the same seed, every backend starts from the same weights.
    """

    cell: str
    backend: str

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        gates = CELL_MATH[cell].gates * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(gates, layer_input)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(gates, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(gates)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_weights(self, layer: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer."""
        return tuple(getattr(self, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def zero_state(self, batch_size: int, like: torch.Tensor):
        h = like.new_zeros(self.num_layers, batch_size, self.hidden_size)
        return (h, h.clone()) if CELL_MATH[self.cell].has_cell_state else h

    def extra_repr(self) -> str:
        return (f"cell={self.cell}, backend={self.backend}, {self.input_size}->{self.hidden_size}, "
                f"layers={self.num_layers}, dropout={self.dropout}")


class LayerwiseStack(RecurrentStack):
    """A stack run one layer at a time, with torch.nn's inter-layer dropout (on every layer's output but the
    last, in training only): the driver of the reference and the fused backends (script, triton, compile).

    Subclasses implement ``run_layer(layer, x, h0, c0)``: x [T, B, E_layer], h0 and c0 [B, H] (c0 None for
    cells without a cell state) -> (y [T, B, H], h_n [B, H], c_n [B, H] or None).
    """

    def run_layer(self, layer: int, x: torch.Tensor, h0: torch.Tensor, c0):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state=None):
        if state is None:
            state = self.zero_state(x.shape[1], x)
        has_c = CELL_MATH[self.cell].has_cell_state
        h0, c0 = state if has_c else (state, None)
        final_h, final_c = [], []
        for layer in range(self.num_layers):
            x, h_n, c_n = self.run_layer(layer, x, h0[layer], c0[layer] if has_c else None)
            final_h.append(h_n)
            final_c.append(c_n)
            if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
        h_n = torch.stack(final_h)
        return x, ((h_n, torch.stack(final_c)) if has_c else h_n)
