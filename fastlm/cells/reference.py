"""The reference backend: a plain PyTorch loop over layers and time steps, fp32, readable.

It is the oracle every other backend is tested against, so it favours clarity over speed.
"""

import torch
import torch.nn.functional as F

from fastlm.cells.base import RecurrentStack
from fastlm.cells.math import gru_pointwise, lstm_pointwise, rnn_relu_pointwise, rnn_tanh_pointwise


class ReferenceStack(RecurrentStack):
    backend = "reference"

    def forward(self, x: torch.Tensor, state=None):
        if state is None:
            state = self.zero_state(x.shape[1], x)
        is_lstm = self.cell == "lstm"
        h0, c0 = state if is_lstm else (state, None)
        final_h, final_c = [], []
        layer_input = x
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
            h = h0[layer]
            c = c0[layer] if is_lstm else None
            outputs = []
            for t in range(layer_input.shape[0]):
                gi = F.linear(layer_input[t], w_ih, b_ih)
                gh = F.linear(h, w_hh, b_hh)
                if is_lstm:
                    h, c = lstm_pointwise(gi, gh, c)
                elif self.cell == "gru":
                    h = gru_pointwise(gi, gh, h)
                elif self.cell == "rnn_tanh":
                    h = rnn_tanh_pointwise(gi, gh)
                else:
                    h = rnn_relu_pointwise(gi, gh)
                outputs.append(h)
            layer_input = torch.stack(outputs)
            final_h.append(h)
            final_c.append(c)
            # torch.nn semantics: dropout on the outputs of every layer but the last, in training only.
            if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        h_n = torch.stack(final_h)
        return layer_input, ((h_n, torch.stack(final_c)) if is_lstm else h_n)
