"""fastlm.kernels' public ops against torch.nn: ``gru`` and ``lstm`` called with a one-layer torch.nn.GRU / LSTM's
own parameters give its output and final states, and the gradients of the input, the initial states and every
weight and bias, under random cotangents on every output (tolerance: tests/tolerances.py). Odd shapes: no
dimension is a multiple of a tile. On CPU the kernels run under Triton's interpreter (conftest.py), compiled on
a GPU; both variants run (the persistent one as one program under the interpreter).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm import cells
from tests.helpers import DEVICE
from tests.tolerances import assert_fp32_parity

TRITON = cells.unavailable_reason("lstm", "triton")
pytestmark = pytest.mark.skipif(TRITON is not None, reason=f"lstm/triton: {TRITON}")
T, B, E, H = 3, 3, 5, 7
TORCH_LAYERS = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def _outputs_and_gradients(outputs, inputs, cotangents) -> dict:
    """{name: tensor}: the outputs, and the gradients of sum(output * cotangent) in every input."""
    loss = sum((out * cot).sum() for out, cot in zip(outputs.values(), cotangents, strict=True))
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return {**{name: out.detach() for name, out in outputs.items()},
            **{f"d{name}": grad for name, grad in zip(inputs, grads, strict=True)}}


@pytest.mark.parametrize("variant", ["per-step", "persistent"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_op_matches_torch_nn_forward_and_backward(cell, variant, monkeypatch):
    monkeypatch.setenv("FASTLM_TRITON_TUNE", "0")  # on a GPU: the heuristic tiles (this checks math, not tuning)
    from fastlm.kernels import gru, lstm

    op = {"gru": gru, "lstm": lstm}[cell]
    torch.manual_seed(0)
    layer = TORCH_LAYERS[cell](E, H).to(DEVICE)
    generator = torch.Generator().manual_seed(1)

    def rand(*size):
        return torch.randn(*size, generator=generator).to(DEVICE)

    states = {"h0": rand(B, H), "c0": rand(B, H)} if cell == "lstm" else {"h0": rand(B, H)}
    inputs = {"x": rand(T, B, E), **states, **dict(layer.named_parameters())}
    for tensor in inputs.values():
        tensor.requires_grad_()
    x, weights = inputs["x"], [inputs[name] for name, _ in layer.named_parameters()]

    ran = {}
    got = op(x, *states.values(), *weights, variant=variant, ran=ran)
    y, final = layer(x, tuple(s[None] for s in states.values()) if cell == "lstm" else states["h0"][None])
    want = (y, *final) if cell == "lstm" else (y, final)
    names = ("y", "h_n", "c_n")[:len(want)]
    cotangents = [rand(*out.shape) for out in want]
    assert_fp32_parity(
        _outputs_and_gradients(dict(zip(names, got, strict=True)), inputs, cotangents),
        _outputs_and_gradients(dict(zip(names, (want[0], *(s[0] for s in want[1:])), strict=True)), inputs,
                               cotangents))
    assert {(kernel, record["variant"]) for kernel, record in ran.items()} == {
        (f"{cell}_forward", variant), (f"{cell}_backward", variant)}

    with torch.no_grad():  # the forward kernels alone, saving nothing
        assert_fp32_parity({"y": op(x, *states.values(), *weights, variant=variant)[0]}, {"y": y.detach()})


def test_importing_the_ops_loads_no_kernel():
    """``from fastlm.kernels import gru, lstm`` imports neither triton nor a kernel module, and sets no
    environment variable: the first call decides whether the kernels run compiled or interpreted."""
    code = ("import os, sys, torch\nbefore = dict(os.environ)\nfrom fastlm.kernels import gru, lstm\n"
            "print('triton' in sys.modules, 'fastlm.kernels.common' in sys.modules, dict(os.environ) == before,"
            " callable(gru) and callable(lstm))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True", "True"]
