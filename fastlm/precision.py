"""The one precision setting of train, bench and profile: fp32, tf32 or bf16.

- ``fp32``: exact everywhere, the example's numbers. TF32 is off in cuBLAS and in cuDNN (whose RNNs and
  convolutions use TF32 for fp32 tensors by default on Ampere and later, which torch's defaults allow).
- ``tf32``: fp32 tensors, but every GEMM and the recurrence may use TF32 tensor cores: cuBLAS (the
  decoder, the input projections), cuDNN's RNN, and the Triton kernels (which follow cuBLAS's flag).
- ``bf16``: fp32 master weights; embedding, recurrence, decoder and loss GEMMs run in bf16 with fp32
  accumulation (fastlm.step.low_precision), on every backend alike. Not torch's autocast: autocast turns a
  cuDNN RNN into fp16, re-casting its weights at every call, and leaves a Triton stack's recurrence in fp32.

The TF32 switches are process-wide torch flags; ``use_precision`` sets them and returns what they were.
Only the legacy ``allow_tf32`` flags are read and written: torch refuses to read them once the newer
``fp32_precision`` ones were set, and the legacy ones exist in every torch fastlm supports.
"""

from __future__ import annotations

import torch

from fastlm.config import PRECISIONS

COMPUTE_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


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
    on = precision == "tf32"
    set_tf32_flags({"matmul_tf32": on, "cudnn_tf32": on})
    return previous


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the model's tensors are computed in at ``precision`` (TF32 is a mode of fp32 GEMMs)."""
    return COMPUTE_DTYPES[precision]
