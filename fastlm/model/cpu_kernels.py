"""The native CPU kernels (kernels/cpu/*.cpp, built by `pip install` through CMakeLists.txt) and their twins.

``softmax_xent_rows`` computes, for one chunk of bf16 logits, the per-token loss, the logits' gradient
(written back in place as bf16, ready for the gradient GEMMs) and the bias gradient, reading each row once
into an fp32 buffer that stays in cache. Its PyTorch twin, ``softmax_xent_rows_torch``, is the reference the
tests hold it to and the path that runs on other devices, in other dtypes, or when the kernel is missing.
``gemm_f32_out`` is the bf16 GEMM with an fp32 result that the gradient GEMMs need (native on AVX512-BF16,
else torch's fp32 GEMM on the bf16 operands; ``native_gemm_reason()`` says which).
``native_kernel()`` returns the module or None, and ``native_missing_reason()`` says why it is missing.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from fastlm.errors import first_line

DISABLE_VARIABLE = "FASTLM_NATIVE_CPU"  # "0": run the PyTorch path even where the kernel is built


@functools.cache
def _load():
    """(module, None) or (None, why it is not there)."""
    if os.environ.get(DISABLE_VARIABLE, "").strip() == "0":
        return None, f"{DISABLE_VARIABLE}=0 is set"
    try:
        from fastlm.kernels import _cpu_xent
    except ImportError as error:
        return None, (f"fastlm was installed without its native CPU kernel ({first_line(error)}); reinstall with "
                      f"`pip install -e .` where cmake and a C++ compiler with OpenMP (GCC's libgomp) exist")
    return _cpu_xent, None


def native_kernel():
    """The compiled module, or None (see native_missing_reason)."""
    return _load()[0]


def native_missing_reason() -> Optional[str]:
    return _load()[1]


def native_gemm_reason() -> Optional[str]:
    """None when the native bf16 GEMM with fp32 output runs here, else why not (the torch path runs then)."""
    kernel = native_kernel()
    if kernel is None:
        return native_missing_reason()
    if not hasattr(kernel, "gemm_bf16_f32"):
        return "the installed native kernel predates its GEMM; reinstall with `pip install -e .`"
    if not _cpu_has_avx512_bf16(kernel):
        return "this CPU has no AVX512-BF16 (the GEMM runs as torch's fp32 GEMM on the bf16 operands)"
    return None


@functools.cache
def _cpu_has_avx512_bf16(kernel) -> bool:
    return kernel.cpu_has_avx512_bf16()


def native_applies(product: torch.Tensor) -> bool:
    """Whether the native kernel can take this chunk: bf16 logits in CPU memory, rows contiguous."""
    return (product.device.type == "cpu" and product.dtype == torch.bfloat16 and product.stride(1) == 1
            and native_kernel() is not None)


def softmax_xent_rows(product: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, scale: float,
                      losses: torch.Tensor, d_bias: Optional[torch.Tensor]) -> None:
    """The native kernel on one chunk (see the module doc and the C++ source for the exact formulas).

    product bf16 [n, V] (rows contiguous; overwritten by the gradient), bias fp32 [V] or None, targets int64
    [n], losses fp32 [n] (written), d_bias fp32 [V] (added to) or None.
    """
    n, vocab = product.shape
    for t, dtype in ((bias, torch.float32), (targets, torch.int64), (losses, torch.float32),
                     (d_bias, torch.float32)):
        if t is not None and (t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"softmax_xent_rows: a contiguous CPU {dtype} tensor expected, got {t.dtype} "
                             f"on {t.device}")
    native_kernel().softmax_xent_rows(product.data_ptr(), bias.data_ptr() if bias is not None else 0,
                                      targets.data_ptr(), losses.data_ptr(),
                                      d_bias.data_ptr() if d_bias is not None else 0, n, vocab, product.stride(0),
                                      scale, torch.get_num_threads())


def softmax_xent_rows_torch(product: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                            scale: float, losses: torch.Tensor, d_bias: Optional[torch.Tensor],
                            logits: torch.Tensor, nll_grad: torch.Tensor) -> None:
    """The same computation in PyTorch ops: widen (adding the bias in fp32) into ``logits`` (fp32 [n, V]),
    log_softmax and its gradient there with ATen's kernels, then round the gradient back into ``product``.
    ``nll_grad`` is an fp32 [n, V] buffer of zeros, left zero."""
    if bias is not None:
        torch.add(product, bias, out=logits)
    else:
        logits.copy_(product)
    log_probs = torch._log_softmax(logits, 1, False, out=logits)
    target_index = targets[:, None]
    torch.neg(log_probs.gather(1, target_index).squeeze(1), out=losses)
    nll_grad.scatter_(1, target_index, -scale)
    grad = torch._log_softmax_backward_data(nll_grad, log_probs, 1, torch.float32, out=logits)
    nll_grad.scatter_(1, target_index, 0.0)
    if d_bias is not None:
        d_bias += grad.sum(0)
    product.copy_(grad)


def gemm_f32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out = a @ b (or out += a @ b) for bf16 ``a`` [m, k] and ``b`` [k, n] into fp32 ``out`` [m, n]: every
    product and sum in fp32 and no rounding of the result to bf16, unlike torch.mm in bf16, whose output is bf16
    (a rounding of up to 2^-9 per element of dh and dW that no long sum averages out: docs/semantics.md).

    On CUDA cuBLAS runs the bf16 GEMM (its bf16 output is widened); on CPU the native kernel where the CPU has
    AVX512-BF16, else torch's fp32 GEMM on the widened operands: the same products and sums, slower.
    """
    if out.device.type == "cuda":
        product = torch.mm(a, b)
        out.add_(product) if accumulate else out.copy_(product)
        return
    if native_gemm_reason() is None:
        _native_gemm(native_kernel(), a, b, out, accumulate)
        return
    if accumulate:
        out.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=out)


def _native_gemm(kernel, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """The native GEMM on any strides of a and b (in elements); out rows contiguous."""
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or tuple(out.shape) != (m, n) or out.stride(1) != 1:
        raise ValueError(f"gemm_f32_out: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)} (out rows "
                         f"contiguous) expected")
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or out.dtype != torch.float32:
        raise ValueError(f"gemm_f32_out: bf16 operands and an fp32 output expected, got {a.dtype}, {b.dtype}, "
                         f"{out.dtype}")
    kernel.gemm_bf16_f32(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
                         out.data_ptr(), out.stride(0), m, n, k, int(accumulate), torch.get_num_threads())
