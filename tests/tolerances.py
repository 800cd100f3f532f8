"""The parity rule, in one place: every test that holds a backend, a kernel, a step or an export to plain PyTorch
imports its bound from here (docs/semantics.md says why the numbers may differ at all).

Per compared tensor:
- fp32: max|a - ref| <= FP32_RTOL * max|ref|, with FP32_RTOL = 1e-5. The error is measured against the tensor's
  largest magnitude, not elementwise: implementations sum in different orders (GEMM tiling, T*B-row reductions
  for weight gradients), so a small element that is the difference of large terms carries an absolute error
  set by the large terms. fp32 rounding is 6e-8 per operation; K-term dot products over a few steps and layers
  stay within ~1e-6 of the largest magnitude (measured: <= 1e-6), so 1e-5 leaves a 10x margin without hiding a
  wrong gate or index (those give errors of order 1e-2 to 1).
- low precision (fp16, bf16, TF32): the error against the fp32 result is at most LOW_PRECISION_FACTOR (2) times
  the error of plain PyTorch in that precision (same weights cast, same inputs), both measured as above.
"""

FP32_RTOL = 1e-5
LOW_PRECISION_FACTOR = 2


def relative_error(got, want) -> float:
    """max|got - want| / max|want| of two tensors."""
    return ((got - want).abs().max() / want.abs().max()).item()


def relative_errors(got: dict, want: dict) -> dict:
    """{name: relative_error} over two dicts of tensors with the same names."""
    assert got.keys() == want.keys()
    return {name: relative_error(got[name], want[name]) for name in want}


def assert_fp32_parity(got: dict, want: dict) -> dict:
    """Every tensor of ``got`` within FP32_RTOL of ``want``'s; returns the errors."""
    errors = relative_errors(got, want)
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= FP32_RTOL}
    assert not bad, f"relative errors above {FP32_RTOL:g}: {bad}"
    return errors


def assert_within_plain_error(got: dict, plain: dict, what: str) -> None:
    """Every error in ``got`` at most LOW_PRECISION_FACTOR times the same tensor's in ``plain`` (errors by name, as
    relative_errors gives them); ``what`` names the comparison in the failure."""
    bad = {name: f"{got[name]:.2e} > {LOW_PRECISION_FACTOR} x {plain[name]:.2e}" for name in plain
           if not got[name] <= LOW_PRECISION_FACTOR * plain[name]}
    assert not bad, f"{what}: {bad}"
