"""The one precision setting of train, bench and profile: fp32, tf32, bf16 or auto.

- ``fp32``: exact everywhere, the example's numbers. TF32 is off in cuBLAS and in cuDNN (whose RNNs and
  convolutions use TF32 for fp32 tensors by default on Ampere and later, which torch's defaults allow).
- ``tf32``: fp32 tensors, but every GEMM and the recurrence may use TF32 tensor cores: cuBLAS (the
  decoder, the input projections), cuDNN's RNN, and the Triton kernels (which follow cuBLAS's flag).
- ``bf16``: the decoder's three GEMMs (logits, dh, dW: nearly all of a step's arithmetic at the example's
  sizes) run in bf16 with fp32 accumulation (dh and dW also kept in fp32 on CPU), on casts made inside the
  fused loss; the embedding, the recurrence, the softmax and loss, the weights, their gradients, clipping and
  the update stay fp32, on every backend alike. Why not the recurrence too, and what rounds where: docs/semantics.md ("Precision",
  "The fused decoder and loss"). Not torch's autocast: autocast turns a cuDNN RNN into fp16.
- ``auto``: bf16 where the device has bf16 matrix units (AMX-BF16 or AVX512-BF16 on a CPU, compute
  capability 8.0 or later on CUDA), else fp32; ``resolve_precision`` says which and why. Not the default:
  the default stays the exact fp32, the example's numbers.

The TF32 switches are process-wide torch flags; ``use_precision`` sets them and returns what they were.
Only the legacy ``allow_tf32`` flags are read and written: torch refuses to read them once the newer
``fp32_precision`` ones were set, and the legacy ones exist in every torch fastlm supports.
"""


from __future__ import annotations

import torch

from fastlm.config import PRECISIONS
from fastlm.device import cpu_flags

COMPUTE_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix or dot-product units


def tf32_flags() -> dict:
    """The two TF32 switches as they stand: cuBLAS matmul (and the Triton kernels) and cuDNN."""
    return {"matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}


def set_tf32_flags(flags: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]


def use_precision(precision: str) -> dict:
    """Sets the TF32 switches for ``precision`` (on for tf32 only); returns the previous ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    previous = tf32_flags()
    on = precision == "tf32"  # auto resolves to bf16 or fp32: TF32 off either way
    set_tf32_flags({"matmul_tf32": on, "cudnn_tf32": on})
    return previous


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the decoder's GEMMs run in at a resolved ``precision`` (TF32 is a mode of fp32 GEMMs)."""
    return COMPUTE_DTYPES[precision]


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """(the precision to run, why) for ``auto``; any other name is itself, with no reason."""
    if precision != "auto":
        return precision, None
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"auto: compute capability {major}.{minor} has bf16 tensor cores"
        return "fp32", f"auto: compute capability {major}.{minor} has no bf16 tensor cores (8.0+ does)"
    if device.type == "cpu":
        found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
        if found:
            return "bf16", f"auto: this CPU has {' and '.join(f.upper().replace('_', '-') for f in found)}"
        return "fp32", "auto: this CPU has neither AMX-BF16 nor AVX512-BF16 (bf16 would be emulated, slower)"
    return "fp32", f"auto: bf16 matrix units are not checked on {device.type}; exact fp32"
