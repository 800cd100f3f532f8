"""Triton helpers shared by the LSTM and GRU step kernels, and their launch configuration.

Importing this module imports triton: only fastlm.cells.triton does so, after deciding whether the
kernels run compiled (CUDA) or through the interpreter (TRITON_INTERPRET=1, CPU tensors).
"""

from dataclasses import dataclass

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc += a @ b with fp32 accumulation; a [M, K], b [K, N] of one dtype, M, N, K >= 16.

    fp32 operands use exact IEEE products unless the caller allows TF32 (the wrapper passes torch's
    ``torch.backends.cuda.matmul.allow_tf32``, so the kernels follow the user's matmul precision choice);
    bf16/fp16 operands use tensor cores and accumulate in fp32.
    """
    if a.dtype == tl.float32:
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tanh(x):
    """tanh through the sigmoid: tl has no portable tanh across the compiler and the interpreter."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def tile_offsets(pid_b, pid_h, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row indices [BLOCK_B], column indices [BLOCK_H] and the in-bounds mask [BLOCK_B, BLOCK_H]
    of the output tile (pid_b, pid_h) of a [B, H] matrix; masking is what makes any B and H work."""
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < B) & (cols[None, :] < H)
    return rows, cols, mask


@triton.jit
def row_times_matrix(a_ptr, a_row_stride, w_ptr, w_row_stride, rows, cols, B, K, N, acc,
                     ALLOW_TF32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """acc += A[rows, :K] @ W[:K, cols] for row-major A (row stride a_row_stride) and W (row stride
    w_row_stride); rows >= B and cols >= N read as zeros. Returns acc [BLOCK_B, BLOCK_H] fp32."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * a_row_stride + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + ks[:, None] * w_row_stride + cols[None, :],
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = mma(a, w, acc, ALLOW_TF32)
    return acc


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of the step kernels (chosen by fastlm.cells.triton).

    block_b, block_h: the (batch, hidden) output tile of one program; block_k: the reduction chunk.
    All are powers of two and at least 16 (tl.dot's minimum); masks handle any B and H.
    """

    block_b: int
    block_h: int
    block_k: int
    num_warps: int = 4
    allow_tf32: bool = False

    def grid(self, B: int, H: int):
        return (triton.cdiv(B, self.block_b), triton.cdiv(H, self.block_h))

    def meta(self) -> dict:
        return dict(ALLOW_TF32=self.allow_tf32, BLOCK_B=self.block_b, BLOCK_H=self.block_h,
                    BLOCK_K=self.block_k, num_warps=self.num_warps)
