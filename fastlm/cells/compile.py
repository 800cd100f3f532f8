"""The compile backend: torch.compile (Inductor) of the reference cell step, a peer for benchmarks.

Per layer, the input projection of all T steps is one GEMM; each time step then calls one compiled
function: the recurrent GEMM plus the shared cell math (fastlm.cells.math), which Inductor fuses into a
single pointwise kernel after the GEMM. It answers "what does torch.compile give for free".

Only the step is compiled, not the time loop: dynamo unrolls Python loops, so compiling the loop would
recompile for every new sequence length (the last bptt chunk is shorter) and compile time would grow
with T. The step follows torch.compile's default shape policy: the first shape compiles static, the first
change of batch or hidden size compiles once more with dynamic sizes, which later shapes reuse. With
grad-mode variants that is a handful of graphs per cell, well under dynamo's recompile limit. Expect the
first forward/backward of a process to take 5-20 s on CPU (Inductor writes and builds C++; later
processes hit its on-disk cache).
"""

import functools
import importlib.util
import shutil
from typing import Optional

import torch
import torch.nn.functional as F

from fastlm.cells.base import LayerwiseStack
from fastlm.cells.math import CELL_MATH
from fastlm.cells.triton import choose_interpreter

CELLS = ("lstm", "gru")  # a benchmark peer of the fused kernels, which implement these two


def probe() -> Optional[str]:
    """None when torch.compile can build the step here; else why not. Cheap: compiles nothing."""
    choose_interpreter()  # torch._dynamo imports triton, fixing how the triton backend's kernels can run
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) does not support this Python/platform"
    if torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed"
    elif not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH"
    return None


def _step(cell: str):
    """One time step of ``cell``: gi_t [B, G, H], h and c [B, H] (c None without a cell state),
    w_hh [G, H, H], b_hh [G, H] -> (h_t, c_t or None)."""
    cell_step = CELL_MATH[cell].step

    def step(gi_t, h, c, w_hh, b_hh):
        return cell_step(gi_t.flatten(1), F.linear(h, w_hh.flatten(0, 1), b_hh.flatten()), h, c)
    return step


@functools.cache
def compiled_step(cell: str):
    """The compiled one-step function of ``cell``; compiled lazily by dynamo on its first call."""
    return torch.compile(_step(cell))


class CompileStack(LayerwiseStack):
    backend = "compile"

    def run_layer(self, layer: int, x: torch.Tensor, h0: torch.Tensor, c0):
        w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
        gates = w_hh.shape[0] // self.hidden_size
        # Gate-split views [.., G, H]: every gate-sized dimension reaches dynamo as G * H, so the chunk
        # in the cell math divides exactly and H stays a dynamic size instead of being specialised.
        gi = F.linear(x, w_ih, b_ih).unflatten(2, (gates, self.hidden_size))  # all T steps as one GEMM
        w_hh = w_hh.unflatten(0, (gates, self.hidden_size))
        b_hh = b_hh.unflatten(0, (gates, self.hidden_size))
        step = compiled_step(self.cell)
        h, c, outputs = h0, c0, []
        for t in range(gi.shape[0]):
            h, c = step(gi[t], h, c, w_hh, b_hh)
            outputs.append(h)
        return torch.stack(outputs), h, c
