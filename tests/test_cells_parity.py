"""Every registered backend against the reference backend (one that cannot run here is SKIPPED, with the reason).

Compared: the output, the final state, and the gradients of the input, the initial state and every weight,
under random cotangents on both the output and the final state. Same weights (the reference's state_dict
loaded into the backend), same inputs. The bound is the parity rule of tests/tolerances.py: fp32 within
FP32_RTOL of the reference per tensor; fp16 / bf16 within twice the error of the plain reference run in that
dtype.

On CPU the triton backend runs under TRITON_INTERPRET=1 (see conftest.py) with the small shapes only;
the large shapes carry the gpu marker for it and run compiled on a CUDA machine. The triton backend is
tested in each of its variants (TRITON_VARIANTS): the per-step kernels and the persistent ones (one
program under the interpreter; on a GPU, several programs behind the grid barrier), at the small shapes
and at TRITON_EDGE_SHAPES (T = 1, B = 1, H not a multiple of any tile).
"""

import pytest
import torch

from fastlm import cells
from tests.helpers import DEVICE, as_list, backend_param, build_pair, make_inputs, run
from tests.tolerances import FP32_RTOL, assert_fp32_parity, assert_within_plain_error, relative_errors

# (T, B, E, H): B not a multiple of 16 and H not a power of two throughout; H = 200 and 650 as asked.
SMALL_SHAPES = [(3, 3, 5, 10), (4, 17, 9, 40)]
LARGE_SHAPES = [(6, 20, 32, 200), (3, 37, 48, 650), (3, 64, 24, 100)]
LAYERS = {"lstm": (1, 2, 3), "gru": (1, 2, 3), "rnn_tanh": (1, 2), "rnn_relu": (1, 2)}
# Backends whose kernels run through an interpreter on CPU: large shapes only on a GPU.
INTERPRETED_ON_CPU = {"triton"}
# The triton backend's variants under test ("auto" picks one of them), and shapes at its edges.
TRITON_VARIANTS = ("per-step", "persistent")
TRITON_EDGE_SHAPES = [(1, 1, 7, 33), (1, 6, 3, 17), (5, 1, 4, 21)]


@pytest.fixture(autouse=True)
def _untuned_triton_tiles(monkeypatch):
    """The triton backend on its heuristic tiles: these tests check the kernels' math, and on a GPU every
    new shape here would otherwise time a compile per candidate tile. Tuning, and parity on tuned tiles,
    are tested in test_triton_kernels.py."""
    monkeypatch.setenv("FASTLM_TRITON_TUNE", "0")


def _backends():
    """Registered (cell, backend, variant) triples other than the reference itself: every triton variant under
    test, None (the backend's only one) elsewhere."""
    return [(cell, backend, variant) for cell, backend in cells.registered() if backend != "reference"
            for variant in (TRITON_VARIANTS if backend == "triton" else (None,))]


def _name(cell, backend, variant):
    return f"{cell}-{backend}" + (f"-{variant}" if variant else "")


def _cases():
    for cell, backend, variant in _backends():
        edge = TRITON_EDGE_SHAPES if backend == "triton" else []
        for layers in LAYERS[cell]:
            for shape in SMALL_SHAPES + edge + LARGE_SHAPES:
                marks = [pytest.mark.gpu] if backend in INTERPRETED_ON_CPU and shape in LARGE_SHAPES else []
                yield backend_param(cell, backend, variant, layers, shape, marks=marks,
                                    id=f"{_name(cell, backend, variant)}-L{layers}-T{shape[0]}B{shape[1]}E{shape[2]}"
                                       f"H{shape[3]}")


def _variant_params(keep=lambda cell, backend: True):
    return [backend_param(c, b, v, id=_name(c, b, v)) for c, b, v in _backends() if keep(c, b)]


@pytest.mark.parametrize("cell, backend, variant, layers, shape", list(_cases()))
def test_matches_reference(cell, backend, variant, layers, shape):
    ref, other = build_pair(cell, backend, shape, layers, variant=variant)
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    if variant is not None:
        assert other.variant == variant, other.variant_reason


@pytest.mark.parametrize("cell, backend, variant", _variant_params())
def test_zero_state_and_inference(cell, backend, variant):
    """state=None means zeros, and the no-grad eval path (kernels that skip saving) gives the same output."""
    shape, layers = (4, 5, 6, 24), 2
    ref, other = build_pair(cell, backend, shape, layers, dropout=0.5, variant=variant)
    x, _, _ = make_inputs(cell, shape, layers)
    ref.eval()
    other.eval()
    with torch.no_grad():
        got, want = other(x), ref(x)
    for a, b in zip([got[0]] + as_list(got[1]), [want[0]] + as_list(want[1]), strict=True):
        assert (a - b).abs().max() <= FP32_RTOL * b.abs().max()


@pytest.mark.parametrize("cell, backend, variant", _variant_params(lambda c, b: b != "cudnn" or DEVICE == "cpu"))
def test_dropout_follows_reference(cell, backend, variant):
    """Inter-layer dropout draws the same masks as the reference (F.dropout on each layer's output but the
    last, in training only), so with one seed outputs and gradients agree. torch.nn on CPU draws them that
    way too; cuDNN draws from a dropout state of its own, so on CUDA cudnn is not compared mask for mask."""
    shape, layers = (4, 6, 5, 16), 3
    ref, other = build_pair(cell, backend, shape, layers, dropout=0.4, variant=variant)
    x, state, cotangents = make_inputs(cell, shape, layers)
    torch.manual_seed(7)
    want = run(ref, cell, x, state, cotangents)
    torch.manual_seed(7)
    got = run(other, cell, x, state, cotangents)
    assert_fp32_parity(got, want)
    torch.manual_seed(8)
    assert relative_errors(run(other, cell, x, state, cotangents), want)["y"] > 1e-3, "dropout had no effect"


@pytest.mark.parametrize("cell, backend, variant", _variant_params(lambda c, b: b == "triton"))
def test_triton_small_tiles_cover_masks(cell, backend, variant):
    """Force 16x16 tiles so that several batch tiles, hidden tiles and reduction chunks, all with ragged
    edges, run in one step (the default tiles on CPU cover these shapes in one program). The persistent
    kernels then stream W_hh in K chunks instead of keeping one resident tile."""
    from fastlm.cells.triton_tiles import LaunchConfig

    shape, layers = (3, 33, 20, 40), 2
    ref, other = build_pair(cell, backend, shape, layers, variant=variant)
    other.launch_config = LaunchConfig(16, 16, 16)
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    if variant == "persistent":
        assert not other.launch_configs()[f"{cell}_forward"]["resident"]


def _low_precision_cases():
    for cell, backend, variant in _backends():
        for dtype in (torch.float16, torch.bfloat16):
            marks = []
            if DEVICE == "cpu" and backend in INTERPRETED_ON_CPU and dtype == torch.bfloat16:
                marks = [pytest.mark.gpu]  # numpy, behind the interpreter, has no bfloat16
            yield backend_param(cell, backend, variant, dtype, marks=marks,
                                id=f"{_name(cell, backend, variant)}-{str(dtype)[6:]}")


@pytest.mark.parametrize("cell, backend, variant, dtype", list(_low_precision_cases()))
def test_low_precision_within_twice_reference_error(cell, backend, variant, dtype):
    shape, layers = ((6, 20, 32, 200) if DEVICE == "cuda" else (4, 17, 9, 40)), 2
    ref, other = build_pair(cell, backend, shape, layers, variant=variant)
    x, state, cotangents = make_inputs(cell, shape, layers)
    exact = run(ref, cell, x, state, cotangents)
    cast = lambda s: tuple(t.to(dtype) for t in s) if isinstance(s, tuple) else s.to(dtype)  # noqa: E731
    ref_err = relative_errors(run(ref.to(dtype), cell, x.to(dtype), cast(state), cotangents), exact)
    got_err = relative_errors(run(other.to(dtype), cell, x.to(dtype), cast(state), cotangents), exact)
    assert_within_plain_error(got_err, ref_err, f"{dtype} errors above twice the plain-PyTorch error")
