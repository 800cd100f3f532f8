"""State dicts move between backends, and training with a fused backend follows the reference.

A stack trained a few SGD steps with one backend is loaded into another and must give the same outputs
(the fp32 parity rule of tests/tolerances.py: max|a - b| <= 1e-5 * max|b|), in both directions; and the same training
run (dropout on, state carried across batches and detached, train/eval switches) gives the same weights
with a fused backend as with the reference.
"""

import pytest
import torch

from fastlm import cells
from tests.helpers import DEVICE, backend_param
from tests.tolerances import FP32_RTOL, relative_error

# Every registered backend but the two these tests load into; one that cannot run here is SKIPPED.
FUSED = [backend_param(cell, backend) for cell, backend in cells.registered() if backend not in ("cudnn", "reference")]
SHAPE = dict(input_size=6, hidden_size=12, num_layers=2)
T, B = 5, 4


def build(cell, backend, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return cells.build(cell=cell, backend=backend, dropout=dropout, **SHAPE).to(DEVICE)


def batches(steps, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, B, SHAPE["input_size"], generator=g).to(DEVICE),
             torch.randn(T, B, SHAPE["hidden_size"], generator=g).to(DEVICE)) for _ in range(steps)]


def detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def train(layer, steps=5, lr=0.5, seed=11):
    """SGD on a regression loss, the language-model way: state carried over and detached each batch."""
    torch.manual_seed(seed)  # the dropout masks
    layer.train()
    state = None
    for x, target in batches(steps):
        y, state = layer(x, state)
        state = detach(state)
        loss = ((y - target) ** 2).mean()
        layer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.25)
        with torch.no_grad():
            for p in layer.parameters():
                p -= lr * p.grad
    layer.eval()
    return layer


def outputs(layer):
    x, _ = batches(1, seed=99)[0]
    with torch.no_grad():
        y, state = layer(x)
    return [y] + (list(state) if isinstance(state, tuple) else [state])


def assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        err = relative_error(a, b)
        assert err <= FP32_RTOL, f"relative error {err:.2e} > {FP32_RTOL:g}"


@pytest.mark.parametrize("cell, backend", FUSED)
def test_trained_state_dict_loads_into_cudnn_and_reference(cell, backend):
    trained = train(build(cell, backend))
    for target in ("cudnn", "reference"):
        other = build(cell, target, seed=1)
        other.load_state_dict(trained.state_dict())
        assert_close(outputs(other.eval()), outputs(trained))


@pytest.mark.parametrize("cell, backend", FUSED)
def test_cudnn_trained_state_dict_loads_into_backend(cell, backend):
    trained = train(build(cell, "cudnn"))
    other = build(cell, backend, seed=1)
    other.load_state_dict(trained.state_dict())
    assert_close(outputs(other.eval()), outputs(trained))


@pytest.mark.parametrize("cell, backend", FUSED)
def test_training_follows_reference(cell, backend):
    """Five steps with dropout 0.3 between layers: same masks (same seed), same gradients, same weights."""
    want = train(build(cell, "reference", dropout=0.3))
    got = train(build(cell, backend, dropout=0.3))
    names = [name for name, _ in want.named_parameters()]
    assert_close([dict(got.named_parameters())[n].detach() for n in names],
                 [dict(want.named_parameters())[n].detach() for n in names])
    assert_close(outputs(got), outputs(want))


@pytest.mark.gpu
@pytest.mark.parametrize("cell, backend", FUSED)
def test_moves_between_cpu_and_gpu(cell, backend):
    """Built on CPU (as a checkpoint loader would), moved with .to('cuda'): same outputs as the reference."""
    torch.manual_seed(0)
    layer = cells.build(cell=cell, backend=backend, **SHAPE).to("cuda")
    ref = cells.build(cell=cell, backend="reference", **SHAPE).to("cuda")
    ref.load_state_dict(layer.state_dict())
    assert_close(outputs(layer.eval()), outputs(ref.eval()))
