"""Triton helpers shared by the LSTM and GRU kernels (per-step and persistent): the GEMM tile, offsets, and
the pointwise math.

Importing this module imports triton: only fastlm.kernels.launch does so (through the kernel modules), after
deciding whether the kernels run compiled (CUDA) or interpreted (TRITON_INTERPRET=1, CPU tensors). The tile
sizes (BLOCK_B, BLOCK_H, BLOCK_K, num_warps) come from fastlm.kernels.tiles.
Names inside kernels: p_x is a pointer (or a block of pointers) into buffer x, b_x a block of values the
program holds (loaded, or computed from loaded ones), acc_x an fp32 accumulator block; offsets, index vectors
and masks (rows, cols, unit, gate, mask) are plain. Elementwise helpers (sigmoid, tanh, exp) take any x.
The step kernels take whole-sequence buffers ([T, B, X], row-major) and the step index t; the row of step t
starts at t * B * X elements, computed in int64, while offsets inside a step (< B * 4H) and inside W_hh
(< 4H * H) are int32 and ``check_offsets`` refuses shapes where they would not fit. Compiled kernels take
exp and tanh from libdevice and divide with IEEE rounding; interpreted ones use tl.exp (chosen at import).
Numerics: docs/semantics.md, "The Triton kernels: what rounds where and why the grid barrier holds".
"""

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def mma(b_x, b_w, acc, ALLOW_TF32: tl.constexpr):
    """acc += b_x @ b_w with fp32 accumulation; b_x [M, K], b_w [K, N] of one dtype, M, N, K >= 16.

    fp32 operands use exact IEEE products unless the caller allows TF32 (the wrapper passes torch's
    ``torch.backends.cuda.matmul.allow_tf32``, read at each call, so the kernels follow the user's matmul
    precision choice); bf16/fp16 operands use tensor cores and accumulate in fp32.
    """
    if b_x.dtype == tl.float32:
        if ALLOW_TF32:
            acc = tl.dot(b_x, b_w, acc, input_precision="tf32")
        else:
            acc = tl.dot(b_x, b_w, acc, input_precision="ieee")
    else:
        acc = tl.dot(b_x, b_w, acc)
    return acc


@triton.jit
def _exp_libdevice(x):
    """e^x for fp32 x through libdevice's expf (<= 2 ulp): compiled kernels."""
    return libdevice.exp(x)


@triton.jit
def _tanh_libdevice(x):
    """tanh of fp32 x through libdevice's tanhf (<= 2 ulp): compiled kernels."""
    return libdevice.tanh(x)


@triton.jit
def _exp_interpreted(x):
    """e^x for fp32 x: numpy's exp under the interpreter."""
    return tl.exp(x)


@triton.jit
def _tanh_interpreted(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow; near 0 its error is
    ~1e-7 absolute, which is what the parity rule measures (relative to the largest magnitude)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = tl.math.div_rn(1.0 - e, 1.0 + e)
    return tl.where(x >= 0, t, -t)


# The interpreter cannot run libdevice; compiled kernels need it for accuracy (docs/semantics.md, "Pointwise
# activations").
INTERPRETED = isinstance(mma, InterpretedFunction)


def _numpy_refuses_one_element_index() -> bool:
    """Whether numpy (>= 2.4) refuses int() of a one-element array that is not 0-dimensional."""
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def _index_scalar_arguments_by_their_element() -> None:
    """Makes the interpreter turn a kernel's scalar arguments into Python ints by their one element.

    The interpreter holds a scalar argument (T, B, H) as a numpy array of shape (1,), and a kernel's
    ``range(0, H, BLOCK_K)`` asks it for an int: Triton 3.6 does int(array), which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a loop failed;
    later Triton takes the one element (.item()), as this does. Installed in the interpreter's own patch
    scope, which puts triton.language back after each launch."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_and_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_and_index


if INTERPRETED and _numpy_refuses_one_element_index():
    _index_scalar_arguments_by_their_element()
exp = _exp_interpreted if INTERPRETED else _exp_libdevice
tanh = _tanh_interpreted if INTERPRETED else _tanh_libdevice


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) for fp32 x, as e^0 / (1 + e) or e / (1 + e) with e = exp(-|x|), so exp never
    overflows; IEEE division (div_rn), not the approximate one Triton emits for ``/``."""
    e = exp(-tl.abs(x))
    return tl.math.div_rn(tl.where(x >= 0, 1.0, e), 1.0 + e)


@triton.jit
def sequence_row(p_seq, t, row_elems):
    """Pointer to row t of a row-major [T, ...] buffer whose rows hold row_elems elements (int64 offset).
    t may be a plain int: the interpreter runs a kernel's ``range`` loops over Python ints."""
    return p_seq + tl.cast(t, tl.int64) * row_elems


@triton.jit
def previous_row(p_init, p_seq, t, row_elems):
    """Pointer to row t-1 of the [T, ...] buffer at p_seq, or to p_init (one row) when t == 0: how a
    step reads h_{t-1} or c_{t-1} from the initial state or from the outputs of the step before."""
    p_row = p_init
    if t > 0:
        p_row = sequence_row(p_seq, t - 1, row_elems)
    return p_row


@triton.jit
def tile_offsets(pid_b, pid_h, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row indices [BLOCK_B], column indices [BLOCK_H] and the in-bounds mask [BLOCK_B, BLOCK_H]
    of the output tile (pid_b, pid_h) of a [B, H] matrix; masking is what makes any B and H work."""
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < B) & (cols[None, :] < H)
    return rows, cols, mask


@triton.jit
def row_times_matrix(p_a, a_row_stride, p_w, w_row_stride, rows, cols, B, K, N, acc,
                     A_CACHE: tl.constexpr, ALLOW_TF32: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[rows, :K] @ W[:K, cols] for row-major A (row stride a_row_stride) and W (row stride
    w_row_stride); rows >= B and cols >= N read as zeros. Returns acc [BLOCK_B, BLOCK_H] fp32.
    A_CACHE is the cache modifier of the loads of A: "" (default caching), or ".cg" (L2 only) where A was
    written by other programs of the same launch (the persistent kernels, kernels/grid_barrier.py)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b_a = tl.load(p_a + rows[:, None] * a_row_stride + ks[None, :],
                      mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0, cache_modifier=A_CACHE)
        b_w = tl.load(p_w + ks[:, None] * w_row_stride + cols[None, :],
                      mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = mma(b_a, b_w, acc, ALLOW_TF32)
    return acc


@triton.jit
def weight_tile(p_w, w_row_stride, cols, H, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_H] tile W[k, cols] (k < BLOCK_K) of a row-major matrix at p_w with row stride
    w_row_stride, rows k >= H and columns cols >= H read as zeros: one gate's whole-K slice of W_hh, which
    the persistent kernels load once and keep on chip (BLOCK_K >= H)."""
    ks = tl.arange(0, BLOCK_K)
    return tl.load(p_w + ks[:, None] * w_row_stride + cols[None, :],
                   mask=(ks[:, None] < H) & (cols[None, :] < H), other=0.0)


@triton.jit
def row_block(p_a, a_row_stride, rows, B, H, A_CACHE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_B, BLOCK_K] block A[rows, :BLOCK_K] of a row-major matrix at p_a (row stride a_row_stride),
    rows >= B and columns >= H read as zeros; A_CACHE as in row_times_matrix. The left operand whose whole
    K = H fits one tile when the right one is a resident weight_tile."""
    ks = tl.arange(0, BLOCK_K)
    return tl.load(p_a + rows[:, None] * a_row_stride + ks[None, :],
                   mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0, cache_modifier=A_CACHE)


def check_offsets(B: int, H: int, gates: int) -> None:
    """Raises ValueError when offsets inside one step ([B, gates*H]) or inside W_hh ([gates*H, H]) would
    not fit the int32 arithmetic the kernels use for them (docs/semantics.md, "Offsets")."""
    if max(B, H) * gates * H >= 2**31:
        raise ValueError(f"the Triton step kernels index one step's [{B}, {gates * H}] rows and W_hh "
                         f"[{gates * H}, {H}] with int32 offsets; this shape needs more than 2**31")


def scratch(dtype, device):
    """rand(*shape, fp32=False): uniform [0, 1) tensors of ``dtype`` (fp32 if asked) on ``device``, the scratch
    buffers a launch is timed on. Values in [0, 1) are like activated gates: the in-place state updates of
    a backward step (dc *= f, dhz = dh * z) stay bounded however often the launch repeats."""
    def rand(*shape, fp32=False):
        return torch.rand(*shape, dtype=torch.float32 if fp32 else dtype, device=device)

    return rand
