"""LSTM layer in Triton: one fused launch per time step forward, one per step backward.

Math and gate order are torch.nn's (fastlm.cells.math.lstm_pointwise): rows of W_ih [4H, E] and
W_hh [4H, H] are the gates [i, f, g, o];
    pre = x_t @ W_ih^T + b_ih + h_{t-1} @ W_hh^T + b_hh
    i, f, o = sigmoid(pre_i, pre_f, pre_o); g = tanh(pre_g)
    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)

Host side (``lstm_layer_forward`` / ``lstm_layer_backward``): the input projection of all T steps is one
GEMM before the loop, the weight gradients are single GEMMs over all T*B rows after it. Every tensor the
kernels touch is contiguous row-major; [B, X] arguments are slices ``buf[t]`` of [T, B, X] buffers.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels.common import mma, row_times_matrix, tanh, tile_offsets


@triton.jit
def lstm_forward_step(gi_ptr, wt_ptr, h_ptr, c_ptr, h_out_ptr, c_out_ptr, gates_ptr, B, H,
                      SAVE_GATES: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One time step: recurrent GEMM + all gate math, for a [BLOCK_B, BLOCK_H] tile of (batch, hidden).

    gi_ptr     [B, 4H] x_t @ W_ih^T + b_ih + b_hh (both biases folded in), input dtype
    wt_ptr     [H, 4H] W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    h_ptr      [B, H]  h_{t-1}, input dtype (h0 or the previous output row y[t-1])
    c_ptr      [B, H]  c_{t-1}, fp32
    h_out_ptr  [B, H]  h_t, written straight into the output y[t], input dtype
    c_out_ptr  [B, H]  c_t, fp32 (kept for every t: the next step and backward read it)
    gates_ptr  [B, 4H] saved for backward when SAVE_GATES: activated i, f, g, o, input dtype
    Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)). Each program computes the four gates of its hidden units,
    so the whole cell update is local to the program and needs no second pass.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 4 * H
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0)
        w = wt_ptr + ks[:, None] * G + cols[None, :]
        w_mask = (ks[:, None] < H) & (cols[None, :] < H)
        acc_i = mma(h, tl.load(w, mask=w_mask, other=0.0), acc_i, ALLOW_TF32)
        acc_f = mma(h, tl.load(w + H, mask=w_mask, other=0.0), acc_f, ALLOW_TF32)
        acc_g = mma(h, tl.load(w + 2 * H, mask=w_mask, other=0.0), acc_g, ALLOW_TF32)
        acc_o = mma(h, tl.load(w + 3 * H, mask=w_mask, other=0.0), acc_o, ALLOW_TF32)

    gate = rows[:, None] * G + cols[None, :]
    i = tl.sigmoid(acc_i + tl.load(gi_ptr + gate, mask=mask, other=0.0).to(tl.float32))
    f = tl.sigmoid(acc_f + tl.load(gi_ptr + gate + H, mask=mask, other=0.0).to(tl.float32))
    g = tanh(acc_g + tl.load(gi_ptr + gate + 2 * H, mask=mask, other=0.0).to(tl.float32))
    o = tl.sigmoid(acc_o + tl.load(gi_ptr + gate + 3 * H, mask=mask, other=0.0).to(tl.float32))
    unit = rows[:, None] * H + cols[None, :]
    c = f * tl.load(c_ptr + unit, mask=mask, other=0.0) + i * g
    tl.store(c_out_ptr + unit, c, mask=mask)
    tl.store(h_out_ptr + unit, (o * tanh(c)).to(h_out_ptr.dtype.element_ty), mask=mask)
    if SAVE_GATES:
        dtype = gates_ptr.dtype.element_ty
        tl.store(gates_ptr + gate, i.to(dtype), mask=mask)
        tl.store(gates_ptr + gate + H, f.to(dtype), mask=mask)
        tl.store(gates_ptr + gate + 2 * H, g.to(dtype), mask=mask)
        tl.store(gates_ptr + gate + 3 * H, o.to(dtype), mask=mask)


@triton.jit
def lstm_backward_step(dgates_next_ptr, w_ptr, dy_ptr, gates_ptr, c_ptr, c_prev_ptr, dc_ptr, dgates_ptr,
                       B, H, HAS_NEXT: tl.constexpr, ALLOW_TF32: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of backward through time: the recurrent dh GEMM fused with the gate-gradient math.

    dgates_next_ptr [B, 4H] dL/dpre at step t+1 (read only when HAS_NEXT), input dtype
    w_ptr           [4H, H] W_hh as stored (row-major), input dtype
    dy_ptr          [B, H]  dL/dy_t from above (the wrapper adds dL/dh_n into the last step's)
    gates_ptr       [B, 4H] the activated gates i, f, g, o saved by the forward step t
    c_ptr, c_prev_ptr [B, H] c_t and c_{t-1}, fp32
    dc_ptr          [B, H]  fp32, updated in place: holds dL/dc_t on entry, dL/dc_{t-1} on exit
    dgates_ptr      [B, 4H] out: dL/dpre at step t, input dtype (feeds step t-1 and the weight GEMMs)
    dh_t = dy_t + dpre_{t+1} @ W_hh is computed here for this tile's hidden units (K runs over all 4H),
    so a step is one launch. Each program reads and writes only its own tile of dc, so the in-place
    update is race-free; dpre_{t+1} was completed by the previous launch.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 4 * H
    unit = rows[:, None] * H + cols[None, :]
    dh = tl.load(dy_ptr + unit, mask=mask, other=0.0).to(tl.float32)
    if HAS_NEXT:
        acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        dh += row_times_matrix(dgates_next_ptr, G, w_ptr, H, rows, cols, B, G, H, acc,
                               ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)

    gate = rows[:, None] * G + cols[None, :]
    i = tl.load(gates_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(gates_ptr + gate + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gates_ptr + gate + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(gates_ptr + gate + 3 * H, mask=mask, other=0.0).to(tl.float32)
    tanh_c = tanh(tl.load(c_ptr + unit, mask=mask, other=0.0))
    dc = tl.load(dc_ptr + unit, mask=mask, other=0.0) + dh * o * (1.0 - tanh_c * tanh_c)
    c_prev = tl.load(c_prev_ptr + unit, mask=mask, other=0.0)
    dtype = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + gate, (dc * g * i * (1.0 - i)).to(dtype), mask=mask)
    tl.store(dgates_ptr + gate + H, (dc * c_prev * f * (1.0 - f)).to(dtype), mask=mask)
    tl.store(dgates_ptr + gate + 2 * H, (dc * i * (1.0 - g * g)).to(dtype), mask=mask)
    tl.store(dgates_ptr + gate + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(dtype), mask=mask)
    tl.store(dc_ptr + unit, dc * f, mask=mask)


def lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, config, save):
    """One LSTM layer over a whole sequence.

    x [T, B, E], h0 and c0 [B, H], weights in torch.nn layout, all of one dtype and device, contiguous;
    config: a LaunchConfig. Returns y [T, B, H] (input dtype), cs [T, B, H] fp32 (every c_t; cs[-1] is the
    final cell state) and gates [T, B, 4H] (activated i, f, g, o; None unless ``save``).
    Launches: 1 GEMM + T step kernels.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    gi = torch.addmm(b_ih + b_hh, x.reshape(T * B, E), w_ih.t()).view(T, B, 4 * H)
    wt = w_hh.t().contiguous()  # [H, 4H]: the step kernel reads W_hh^T tiles along contiguous rows
    y = x.new_empty(T, B, H)
    cs = x.new_empty(T, B, H, dtype=torch.float32)
    gates = x.new_empty(T, B, 4 * H) if save else None
    c_init = c0.float()
    launch = lstm_forward_step[config.grid(B, H)]
    for t in range(T):
        # Without SAVE_GATES the kernel never touches gates_ptr; gi[t] only fills the argument slot.
        launch(gi[t], wt, h0 if t == 0 else y[t - 1], c_init if t == 0 else cs[t - 1], y[t], cs[t],
               gates[t] if save else gi[t], B, H, SAVE_GATES=save, **config.meta())
    return y, cs, gates


def lstm_layer_backward(x, h0, c0, w_ih, w_hh, y, cs, gates, dy, dh_n, dc_n, config):
    """Gradients of one LSTM layer from what ``lstm_layer_forward`` saved.

    dy [T, B, H], dh_n and dc_n [B, H]: cotangents of y and of the final state. Returns
    (dx [T, B, E], dh0 [B, H], dc0 [B, H], dW_ih, dW_hh, db_ih, db_hh). Launches: T step kernels, then
    GEMMs over all T*B rows: dx = dG W_ih, dW_ih = dG^T X, dW_hh = dG^T [h0; y[:-1]], db = column sums of dG.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    dgates = torch.empty_like(gates)
    dc = dc_n.float().clone()
    dy = dy.contiguous()
    dy_last = (dy[T - 1] + dh_n).contiguous()
    c_init = c0.float()
    launch = lstm_backward_step[config.grid(B, H)]
    for t in reversed(range(T)):
        has_next = t < T - 1
        # At t = T-1 there is no step t+1: HAS_NEXT=False and dgates[t] only fills the argument slot.
        launch(dgates[t + 1] if has_next else dgates[t], w_hh, dy[t] if has_next else dy_last, gates[t],
               cs[t], cs[t - 1] if t > 0 else c_init, dc, dgates[t], B, H, HAS_NEXT=has_next, **config.meta())
    dg = dgates.view(T * B, 4 * H)
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).view(T * B, H)
    db = dg.sum(0)
    return ((dg @ w_ih).view(T, B, E), dgates[0] @ w_hh, dc.to(c0.dtype),
            dg.t() @ x.reshape(T * B, E), dg.t() @ h_prev, db, db.clone())
