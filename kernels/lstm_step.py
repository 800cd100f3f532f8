"""LSTM kernels in Triton, per-step variant: one fused launch per time step forward, one per step backward.

Math and gate order are torch.nn's (fastlm.cells.math.lstm_pointwise): rows of W_ih [4H, E] and
W_hh [4H, H] are the gates [i, f, g, o];
    pre = x_t @ W_ih^T + b_ih + h_{t-1} @ W_hh^T + b_hh
    i, f, o = sigmoid(pre_i, pre_f, pre_o); g = tanh(pre_g)
    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)

The time loops here (``lstm_forward_steps`` / ``lstm_backward_steps``, T launches) are what
kernels/lstm_layer.py (the host side and the public ``lstm``) runs per layer unless the persistent ones
(kernels/lstm_persistent.py, one launch) are chosen. Every tensor the kernels touch is contiguous row-major.
The step kernels take the whole-sequence buffers and the step index t (see kernels/common.py): every
launch of a sequence passes the same tensors, only t (and, backward, HAS_NEXT at the last step) changes.
``config`` is a fastlm.kernels.tiles.LaunchConfig (tile sizes and warps); ``allow_tf32`` lets fp32
GEMM tiles use TF32. The tile functions (``lstm_recurrent_chunks``, ``lstm_cell_update``,
``lstm_gate_gradients``) are shared with the persistent kernels, so both variants compute the same math.
Names: p_ pointers, b_ blocks (common.py).
"""

import triton
import triton.language as tl
from fastlm.kernels.common import (
    check_offsets,
    mma,
    previous_row,
    row_times_matrix,
    scratch,
    sequence_row,
    sigmoid,
    tanh,
    tile_offsets,
)


@triton.jit
def lstm_recurrent_chunks(p_h, p_wt, rows, cols, B, H, H_CACHE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} @ W_hh^T for the four gates of the tile (rows, cols), reading K in BLOCK_K chunks.

    p_h        [B, H]     h_{t-1}, input dtype; rows >= B read as zeros
    p_wt       [H, 4H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    H_CACHE    the cache modifier of the loads of h (see row_times_matrix)
    Returns acc_i, acc_f, acc_g, acc_o, each [BLOCK_B, BLOCK_H] fp32.
    """
    G = 4 * H
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b_h = tl.load(p_h + rows[:, None] * H + ks[None, :],
                      mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0, cache_modifier=H_CACHE)
        p_w = p_wt + ks[:, None] * G + cols[None, :]
        w_mask = (ks[:, None] < H) & (cols[None, :] < H)
        acc_i = mma(b_h, tl.load(p_w, mask=w_mask, other=0.0), acc_i, ALLOW_TF32)
        acc_f = mma(b_h, tl.load(p_w + H, mask=w_mask, other=0.0), acc_f, ALLOW_TF32)
        acc_g = mma(b_h, tl.load(p_w + 2 * H, mask=w_mask, other=0.0), acc_g, ALLOW_TF32)
        acc_o = mma(b_h, tl.load(p_w + 3 * H, mask=w_mask, other=0.0), acc_o, ALLOW_TF32)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def lstm_cell_update(acc_i, acc_f, acc_g, acc_o, p_gi, p_y, p_c0, p_cs, p_gates, t, B, H, rows, cols,
                     mask, SAVE_GATES: tl.constexpr):
    """The gate math of step t for the tile (rows, cols) whose recurrent products are acc_* [BLOCK_B, BLOCK_H]
    (fp32): adds the input projection, activates, updates c and writes h_t, c_t (and the gates). Buffers as
    lstm_forward_step's; mask [BLOCK_B, BLOCK_H] is the tile's in-bounds mask."""
    G = 4 * H
    p_gi_t = sequence_row(p_gi, t, B * G)
    gate = rows[:, None] * G + cols[None, :]
    b_i = sigmoid(acc_i + tl.load(p_gi_t + gate, mask=mask, other=0.0).to(tl.float32))
    b_f = sigmoid(acc_f + tl.load(p_gi_t + gate + H, mask=mask, other=0.0).to(tl.float32))
    b_g = tanh(acc_g + tl.load(p_gi_t + gate + 2 * H, mask=mask, other=0.0).to(tl.float32))
    b_o = sigmoid(acc_o + tl.load(p_gi_t + gate + 3 * H, mask=mask, other=0.0).to(tl.float32))
    unit = rows[:, None] * H + cols[None, :]
    b_c = b_f * tl.load(previous_row(p_c0, p_cs, t, B * H) + unit, mask=mask, other=0.0) + b_i * b_g
    tl.store(sequence_row(p_cs, t, B * H) + unit, b_c, mask=mask)
    tl.store(sequence_row(p_y, t, B * H) + unit, (b_o * tanh(b_c)).to(p_y.dtype.element_ty), mask=mask)
    if SAVE_GATES:
        p_gates_t = sequence_row(p_gates, t, B * G)
        dtype = p_gates.dtype.element_ty
        tl.store(p_gates_t + gate, b_i.to(dtype), mask=mask)
        tl.store(p_gates_t + gate + H, b_f.to(dtype), mask=mask)
        tl.store(p_gates_t + gate + 2 * H, b_g.to(dtype), mask=mask)
        tl.store(p_gates_t + gate + 3 * H, b_o.to(dtype), mask=mask)


@triton.jit
def lstm_gate_gradients(b_dh, p_dgates, p_gates, p_c0, p_cs, p_dc, t, B, H, rows, cols, mask):
    """Backward gate math of step t for the tile (rows, cols), given b_dh = dL/dh_t [BLOCK_B, BLOCK_H] fp32:
    writes row t of dgates (dL/dpre) and turns the tile of dc from dL/dc_t into dL/dc_{t-1}. Buffers as
    lstm_backward_step's; mask [BLOCK_B, BLOCK_H] is the tile's in-bounds mask."""
    G = 4 * H
    unit = rows[:, None] * H + cols[None, :]
    p_gates_t = sequence_row(p_gates, t, B * G)
    gate = rows[:, None] * G + cols[None, :]
    b_i = tl.load(p_gates_t + gate, mask=mask, other=0.0).to(tl.float32)
    b_f = tl.load(p_gates_t + gate + H, mask=mask, other=0.0).to(tl.float32)
    b_g = tl.load(p_gates_t + gate + 2 * H, mask=mask, other=0.0).to(tl.float32)
    b_o = tl.load(p_gates_t + gate + 3 * H, mask=mask, other=0.0).to(tl.float32)
    b_tanh_c = tanh(tl.load(sequence_row(p_cs, t, B * H) + unit, mask=mask, other=0.0))
    b_dc = tl.load(p_dc + unit, mask=mask, other=0.0) + b_dh * b_o * (1.0 - b_tanh_c * b_tanh_c)
    b_c_prev = tl.load(previous_row(p_c0, p_cs, t, B * H) + unit, mask=mask, other=0.0)
    p_dgates_t = sequence_row(p_dgates, t, B * G)
    dtype = p_dgates.dtype.element_ty
    tl.store(p_dgates_t + gate, (b_dc * b_g * b_i * (1.0 - b_i)).to(dtype), mask=mask)
    tl.store(p_dgates_t + gate + H, (b_dc * b_c_prev * b_f * (1.0 - b_f)).to(dtype), mask=mask)
    tl.store(p_dgates_t + gate + 2 * H, (b_dc * b_i * (1.0 - b_g * b_g)).to(dtype), mask=mask)
    tl.store(p_dgates_t + gate + 3 * H, (b_dh * b_tanh_c * b_o * (1.0 - b_o)).to(dtype), mask=mask)
    tl.store(p_dc + unit, b_dc * b_f, mask=mask)


@triton.jit(do_not_specialize=["t"])
def lstm_forward_step(p_gi, p_wt, p_h0, p_y, p_c0, p_cs, p_gates, t, B, H,
                      SAVE_GATES: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t: recurrent GEMM + all gate math, for a [BLOCK_B, BLOCK_H] tile of (batch, hidden).

    p_gi       [T, B, 4H] x @ W_ih^T + b_ih + b_hh (both biases folded in), input dtype; reads row t
    p_wt       [H, 4H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    p_h0       [B, H]     the initial h, input dtype; read at t == 0
    p_y        [T, B, H]  the outputs, input dtype: reads h_{t-1} = row t-1 (t > 0), writes h_t to row t
    p_c0       [B, H]     the initial c, fp32; read at t == 0
    p_cs       [T, B, H]  every c_t, fp32: reads c_{t-1} = row t-1 (t > 0), writes c_t to row t
    p_gates    [T, B, 4H] when SAVE_GATES, row t gets the activated i, f, g, o for backward, input dtype
    t          the step, a runtime int (not specialized: one compiled kernel serves every step)
    Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)). Each program computes the four gates of its hidden units,
    so the whole cell update is local to the program and needs no second pass.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    acc_i, acc_f, acc_g, acc_o = lstm_recurrent_chunks(previous_row(p_h0, p_y, t, B * H), p_wt, rows, cols,
                                                       B, H, "", ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    lstm_cell_update(acc_i, acc_f, acc_g, acc_o, p_gi, p_y, p_c0, p_cs, p_gates, t, B, H, rows, cols, mask,
                     SAVE_GATES)


@triton.jit(do_not_specialize=["t"])
def lstm_backward_step(p_dgates, p_w, p_dy, p_dh_n, p_gates, p_c0, p_cs, p_dc, t, B, H,
                       HAS_NEXT: tl.constexpr, ALLOW_TF32: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t of backward through time: the recurrent dh GEMM fused with the gate-gradient math.

    p_dgates   [T, B, 4H] dL/dpre, input dtype: reads row t+1 (when HAS_NEXT), writes row t (it feeds
                          step t-1 and the weight GEMMs)
    p_w        [4H, H]    W_hh as stored (row-major), input dtype
    p_dy       [T, B, H]  dL/dy from above, input dtype; reads row t
    p_dh_n     [B, H]     dL/dh_n, the final state's cotangent, input dtype; read at the last step only
    p_gates    [T, B, 4H] the activated gates i, f, g, o saved by the forward; reads row t
    p_c0       [B, H]     the initial c, fp32; read at t == 0
    p_cs       [T, B, H]  every c_t, fp32; reads rows t and t-1
    p_dc       [B, H]     fp32, updated in place: holds dL/dc_t on entry, dL/dc_{t-1} on exit
    t          the step, a runtime int; HAS_NEXT is False only at the last step, t = T-1
    dh_t = dy_t + dpre_{t+1} @ W_hh (K runs over all 4H) is computed here for this tile's hidden units; at
    the last step there is no step t+1 and dL/dh_n stands in for that term, so no buffer is copied to fold
    it in. A step is one launch. Each program reads and writes only its own tile of dc, so the in-place
    update is race-free; dpre_{t+1} was completed by the previous launch.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 4 * H
    unit = rows[:, None] * H + cols[None, :]
    b_dh = tl.load(sequence_row(p_dy, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
    if HAS_NEXT:
        acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        b_dh += row_times_matrix(sequence_row(p_dgates, t + 1, B * G), G, p_w, H, rows, cols, B, G, H, acc,
                                 "", ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        b_dh += tl.load(p_dh_n + unit, mask=mask, other=0.0).to(tl.float32)
    lstm_gate_gradients(b_dh, p_dgates, p_gates, p_c0, p_cs, p_dc, t, B, H, rows, cols, mask)


def lstm_forward_launcher(gi, wt, h0, y, c0, cs, gates, config, allow_tf32):
    """launch(t): runs the forward step kernel for step t on these buffers (shapes as lstm_forward_step's;
    gates None: nothing saved). Everything but t is bound here, once per sequence."""
    B, H = h0.shape
    check_offsets(B, H, 4)
    kernel = lstm_forward_step[config.grid(B, H)]
    meta = dict(SAVE_GATES=gates is not None, ALLOW_TF32=allow_tf32, **config.meta())
    gates = gi if gates is None else gates  # without SAVE_GATES only fills the argument slot

    def launch(t: int) -> None:
        kernel(gi, wt, h0, y, c0, cs, gates, t, B, H, **meta)

    return launch


def lstm_backward_launcher(dgates, w_hh, dy, dh_n, gates, c0, cs, dc, config, allow_tf32):
    """launch(t): runs the backward step kernel for step t on these buffers (shapes as lstm_backward_step's).
    HAS_NEXT follows from t: False at the last step only."""
    T, B, H = dy.shape
    check_offsets(B, H, 4)
    kernel = lstm_backward_step[config.grid(B, H)]
    meta = dict(ALLOW_TF32=allow_tf32, **config.meta())

    def launch(t: int) -> None:
        kernel(dgates, w_hh, dy, dh_n, gates, c0, cs, dc, t, B, H, HAS_NEXT=t < T - 1, **meta)

    return launch


def lstm_forward_steps(gi, wt, h0, y, c0, cs, gates, config, allow_tf32):
    """The forward time loop of one layer as T step launches (buffers as lstm_forward_step's)."""
    launch = lstm_forward_launcher(gi, wt, h0, y, c0, cs, gates, config, allow_tf32)
    for t in range(gi.shape[0]):
        launch(t)


def lstm_backward_steps(dgates, w_hh, dy, dh_n, gates, c0, cs, dc, config, allow_tf32):
    """The backward time loop of one layer as T step launches, last step first (buffers as
    lstm_backward_step's)."""
    launch = lstm_backward_launcher(dgates, w_hh, dy, dh_n, gates, c0, cs, dc, config, allow_tf32)
    for t in reversed(range(dy.shape[0])):
        launch(t)


def lstm_forward_scratch(B, H, dtype, device, config, allow_tf32):
    """A zero-argument launch of one forward step (t = 1 of 2, gates saved: the training path) on scratch
    buffers of this shape: what the tile tuner times (fastlm.kernels.tiles)."""
    rand = scratch(dtype, device)
    launch = lstm_forward_launcher(rand(2, B, 4 * H), rand(H, 4 * H), rand(B, H), rand(2, B, H), rand(B, H, fp32=True),
                                   rand(2, B, H, fp32=True), rand(2, B, 4 * H), config, allow_tf32)
    return lambda: launch(1)


def lstm_backward_scratch(B, H, dtype, device, config, allow_tf32):
    """A zero-argument launch of one backward step (t = 0 of 2, with the recurrent GEMM: every step but the
    last) on scratch buffers of this shape: what the tile tuner times."""
    rand = scratch(dtype, device)
    launch = lstm_backward_launcher(rand(2, B, 4 * H), rand(4 * H, H), rand(2, B, H), rand(B, H), rand(2, B, 4 * H),
                                    rand(B, H, fp32=True), rand(2, B, H, fp32=True), rand(B, H, fp32=True),
                                    config, allow_tf32)
    return lambda: launch(0)
