"""The reference backend: a plain PyTorch loop over layers and time steps, fp32, readable.

It is the oracle every other backend is tested against, so it favours clarity over speed: each step
projects its input and its state, then applies the cell's math from fastlm.cells.math.
"""

import torch
import torch.nn.functional as F

from fastlm.cells.base import LayerwiseStack
from fastlm.cells.math import CELL_MATH


class ReferenceStack(LayerwiseStack):
    backend = "reference"

    def run_layer(self, layer: int, x: torch.Tensor, h: torch.Tensor, c):
        w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
        step = CELL_MATH[self.cell].step
        outputs = []
        for t in range(x.shape[0]):
            h, c = step(F.linear(x[t], w_ih, b_ih), F.linear(h, w_hh, b_hh), h, c)
            outputs.append(h)
        return torch.stack(outputs), h, c
