"""LSTM layer in Triton: one fused launch per time step forward, one per step backward (the per-step variant;
kernels/persistent_lstm.py walks the whole sequence in one launch with the same cell math, from here).

Math and gate order are torch.nn's (fastlm.cells.math.lstm_pointwise): rows of W_ih [4H, E] and
W_hh [4H, H] are the gates [i, f, g, o];
    pre = x_t @ W_ih^T + b_ih + h_{t-1} @ W_hh^T + b_hh
    i, f, o = sigmoid(pre_i, pre_f, pre_o); g = tanh(pre_g)
    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)

Host side (``lstm_layer_forward`` / ``lstm_layer_backward``): the input projection of all T steps is one
GEMM before the time loop, the weight gradients are single GEMMs over all T*B rows after it; the time loop
itself is the ``steps`` function the caller passes: ``lstm_forward_steps`` / ``lstm_backward_steps`` here
(T launches), or the persistent ones (one launch). Every tensor the kernels touch is contiguous row-major.
The step kernels take the whole-sequence buffers and the step index t (see kernels/common.py): every
launch of a sequence passes the same tensors, only t (and, backward, HAS_NEXT at the last step) changes.
``config`` is a fastlm.cells.triton_tiles.LaunchConfig (tile sizes and warps); ``allow_tf32`` lets fp32
GEMM tiles use TF32. The tile functions (``lstm_recurrent_chunks``, ``lstm_cell_update``,
``lstm_gate_gradients``) are shared with the persistent kernels, so both variants compute the same math.
"""

import torch
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
def lstm_recurrent_chunks(h_ptr, wt_ptr, rows, cols, B, H, H_CACHE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} @ W_hh^T for the four gates of the tile (rows, cols), reading K in BLOCK_K chunks.

    h_ptr      [B, H]     h_{t-1}, input dtype; rows >= B read as zeros
    wt_ptr     [H, 4H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
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
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0, cache_modifier=H_CACHE)
        w = wt_ptr + ks[:, None] * G + cols[None, :]
        w_mask = (ks[:, None] < H) & (cols[None, :] < H)
        acc_i = mma(h, tl.load(w, mask=w_mask, other=0.0), acc_i, ALLOW_TF32)
        acc_f = mma(h, tl.load(w + H, mask=w_mask, other=0.0), acc_f, ALLOW_TF32)
        acc_g = mma(h, tl.load(w + 2 * H, mask=w_mask, other=0.0), acc_g, ALLOW_TF32)
        acc_o = mma(h, tl.load(w + 3 * H, mask=w_mask, other=0.0), acc_o, ALLOW_TF32)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def lstm_cell_update(acc_i, acc_f, acc_g, acc_o, gi_ptr, y_ptr, c0_ptr, cs_ptr, gates_ptr, t, B, H, rows, cols,
                     mask, SAVE_GATES: tl.constexpr):
    """The gate math of step t for the tile (rows, cols) whose recurrent products are acc_* [BLOCK_B, BLOCK_H]
    (fp32): adds the input projection, activates, updates c and writes h_t, c_t (and the gates). Buffers as
    lstm_forward_step's; mask [BLOCK_B, BLOCK_H] is the tile's in-bounds mask."""
    G = 4 * H
    gi = sequence_row(gi_ptr, t, B * G)
    gate = rows[:, None] * G + cols[None, :]
    i = sigmoid(acc_i + tl.load(gi + gate, mask=mask, other=0.0).to(tl.float32))
    f = sigmoid(acc_f + tl.load(gi + gate + H, mask=mask, other=0.0).to(tl.float32))
    g = tanh(acc_g + tl.load(gi + gate + 2 * H, mask=mask, other=0.0).to(tl.float32))
    o = sigmoid(acc_o + tl.load(gi + gate + 3 * H, mask=mask, other=0.0).to(tl.float32))
    unit = rows[:, None] * H + cols[None, :]
    c = f * tl.load(previous_row(c0_ptr, cs_ptr, t, B * H) + unit, mask=mask, other=0.0) + i * g
    tl.store(sequence_row(cs_ptr, t, B * H) + unit, c, mask=mask)
    tl.store(sequence_row(y_ptr, t, B * H) + unit, (o * tanh(c)).to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_GATES:
        gates = sequence_row(gates_ptr, t, B * G)
        dtype = gates_ptr.dtype.element_ty
        tl.store(gates + gate, i.to(dtype), mask=mask)
        tl.store(gates + gate + H, f.to(dtype), mask=mask)
        tl.store(gates + gate + 2 * H, g.to(dtype), mask=mask)
        tl.store(gates + gate + 3 * H, o.to(dtype), mask=mask)


@triton.jit
def lstm_gate_gradients(dh, dgates_ptr, gates_ptr, c0_ptr, cs_ptr, dc_ptr, t, B, H, rows, cols, mask):
    """Backward gate math of step t for the tile (rows, cols), given dh = dL/dh_t [BLOCK_B, BLOCK_H] fp32:
    writes row t of dgates (dL/dpre) and turns the tile of dc from dL/dc_t into dL/dc_{t-1}. Buffers as
    lstm_backward_step's; mask [BLOCK_B, BLOCK_H] is the tile's in-bounds mask."""
    G = 4 * H
    unit = rows[:, None] * H + cols[None, :]
    saved = sequence_row(gates_ptr, t, B * G)
    gate = rows[:, None] * G + cols[None, :]
    i = tl.load(saved + gate, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(saved + gate + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(saved + gate + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(saved + gate + 3 * H, mask=mask, other=0.0).to(tl.float32)
    tanh_c = tanh(tl.load(sequence_row(cs_ptr, t, B * H) + unit, mask=mask, other=0.0))
    dc = tl.load(dc_ptr + unit, mask=mask, other=0.0) + dh * o * (1.0 - tanh_c * tanh_c)
    c_prev = tl.load(previous_row(c0_ptr, cs_ptr, t, B * H) + unit, mask=mask, other=0.0)
    dgates = sequence_row(dgates_ptr, t, B * G)
    dtype = dgates_ptr.dtype.element_ty
    tl.store(dgates + gate, (dc * g * i * (1.0 - i)).to(dtype), mask=mask)
    tl.store(dgates + gate + H, (dc * c_prev * f * (1.0 - f)).to(dtype), mask=mask)
    tl.store(dgates + gate + 2 * H, (dc * i * (1.0 - g * g)).to(dtype), mask=mask)
    tl.store(dgates + gate + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(dtype), mask=mask)
    tl.store(dc_ptr + unit, dc * f, mask=mask)


@triton.jit(do_not_specialize=["t"])
def lstm_forward_step(gi_ptr, wt_ptr, h0_ptr, y_ptr, c0_ptr, cs_ptr, gates_ptr, t, B, H,
                      SAVE_GATES: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t: recurrent GEMM + all gate math, for a [BLOCK_B, BLOCK_H] tile of (batch, hidden).

    gi_ptr     [T, B, 4H] x @ W_ih^T + b_ih + b_hh (both biases folded in), input dtype; reads row t
    wt_ptr     [H, 4H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    h0_ptr     [B, H]     the initial h, input dtype; read at t == 0
    y_ptr      [T, B, H]  the outputs, input dtype: reads h_{t-1} = row t-1 (t > 0), writes h_t to row t
    c0_ptr     [B, H]     the initial c, fp32; read at t == 0
    cs_ptr     [T, B, H]  every c_t, fp32: reads c_{t-1} = row t-1 (t > 0), writes c_t to row t
    gates_ptr  [T, B, 4H] when SAVE_GATES, row t gets the activated i, f, g, o for backward, input dtype
    t          the step, a runtime int (not specialized: one compiled kernel serves every step)
    Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)). Each program computes the four gates of its hidden units,
    so the whole cell update is local to the program and needs no second pass.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    acc_i, acc_f, acc_g, acc_o = lstm_recurrent_chunks(previous_row(h0_ptr, y_ptr, t, B * H), wt_ptr, rows, cols,
                                                       B, H, "", ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    lstm_cell_update(acc_i, acc_f, acc_g, acc_o, gi_ptr, y_ptr, c0_ptr, cs_ptr, gates_ptr, t, B, H, rows, cols, mask,
                     SAVE_GATES)


@triton.jit(do_not_specialize=["t"])
def lstm_backward_step(dgates_ptr, w_ptr, dy_ptr, dh_n_ptr, gates_ptr, c0_ptr, cs_ptr, dc_ptr, t, B, H,
                       HAS_NEXT: tl.constexpr, ALLOW_TF32: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t of backward through time: the recurrent dh GEMM fused with the gate-gradient math.

    dgates_ptr [T, B, 4H] dL/dpre, input dtype: reads row t+1 (when HAS_NEXT), writes row t (it feeds
                          step t-1 and the weight GEMMs)
    w_ptr      [4H, H]    W_hh as stored (row-major), input dtype
    dy_ptr     [T, B, H]  dL/dy from above, input dtype; reads row t
    dh_n_ptr   [B, H]     dL/dh_n, the final state's cotangent, input dtype; read at the last step only
    gates_ptr  [T, B, 4H] the activated gates i, f, g, o saved by the forward; reads row t
    c0_ptr     [B, H]     the initial c, fp32; read at t == 0
    cs_ptr     [T, B, H]  every c_t, fp32; reads rows t and t-1
    dc_ptr     [B, H]     fp32, updated in place: holds dL/dc_t on entry, dL/dc_{t-1} on exit
    t          the step, a runtime int; HAS_NEXT is False only at the last step, t = T-1
    dh_t = dy_t + dpre_{t+1} @ W_hh (K runs over all 4H) is computed here for this tile's hidden units; at
    the last step there is no step t+1 and dL/dh_n stands in for that term, so no buffer is copied to fold
    it in. A step is one launch. Each program reads and writes only its own tile of dc, so the in-place
    update is race-free; dpre_{t+1} was completed by the previous launch.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 4 * H
    unit = rows[:, None] * H + cols[None, :]
    dh = tl.load(sequence_row(dy_ptr, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
    if HAS_NEXT:
        acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        dh += row_times_matrix(sequence_row(dgates_ptr, t + 1, B * G), G, w_ptr, H, rows, cols, B, G, H, acc,
                               "", ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        dh += tl.load(dh_n_ptr + unit, mask=mask, other=0.0).to(tl.float32)
    lstm_gate_gradients(dh, dgates_ptr, gates_ptr, c0_ptr, cs_ptr, dc_ptr, t, B, H, rows, cols, mask)


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


def lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, steps, save):
    """One LSTM layer over a whole sequence.

    x [T, B, E], h0 and c0 [B, H], weights in torch.nn layout, all of one dtype and device, contiguous.
    steps(gi, wt, h0, y, c0, cs, gates) runs the time loop (``lstm_forward_steps`` with its config bound,
    or the persistent one). Returns y [T, B, H] (input dtype), cs [T, B, H] fp32 (every c_t; cs[-1] is the
    final cell state) and gates [T, B, 4H] (activated i, f, g, o; None unless ``save``).
    Launches: 1 GEMM + the time loop's.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    gi = torch.addmm(b_ih + b_hh, x.reshape(T * B, E), w_ih.t()).view(T, B, 4 * H)
    wt = w_hh.t().contiguous()  # [H, 4H]: the kernels read W_hh^T tiles along contiguous rows
    y = x.new_empty(T, B, H)
    cs = x.new_empty(T, B, H, dtype=torch.float32)
    gates = x.new_empty(T, B, 4 * H) if save else None
    steps(gi, wt, h0, y, c0.float(), cs, gates)
    return y, cs, gates


def lstm_layer_backward(x, h0, c0, w_ih, w_hh, y, cs, gates, dy, dh_n, dc_n, steps):
    """Gradients of one LSTM layer from what ``lstm_layer_forward`` saved.

    dy [T, B, H], dh_n and dc_n [B, H]: cotangents of y and of the final state. steps(dgates, w_hh, dy,
    dh_n, gates, c0, cs, dc) runs the backward time loop (``lstm_backward_steps`` bound, or the persistent
    one). Returns (dx [T, B, E], dh0 [B, H], dc0 [B, H], dW_ih, dW_hh, db_ih, db_hh). Launches: the time
    loop's, then GEMMs over all T*B rows: dx = dG W_ih, dW_ih = dG^T X, dW_hh = dG^T [h0; y[:-1]],
    db = column sums of dG.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    dgates = torch.empty_like(gates)
    dc = dc_n.float().clone()
    steps(dgates, w_hh, dy.contiguous(), dh_n.contiguous(), gates, c0.float(), cs, dc)
    dg = dgates.view(T * B, 4 * H)
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).view(T * B, H)
    db = dg.sum(0)
    return ((dg @ w_ih).view(T, B, E), dgates[0] @ w_hh, dc.to(c0.dtype),
            dg.t() @ x.reshape(T * B, E), dg.t() @ h_prev, db, db.clone())


def lstm_forward_scratch(B, H, dtype, device, config, allow_tf32):
    """A zero-argument launch of one forward step (t = 1 of 2, gates saved: the training path) on scratch
    buffers of this shape: what the tile tuner times (fastlm.cells.triton_tiles)."""
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
