"""GRU layer in Triton: one fused launch per time step forward, one per step backward.

Math and gate order are torch.nn's (fastlm.cells.math.gru_pointwise): rows of W_ih [3H, E] and
W_hh [3H, H] are the gates [r, z, n];
    r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)      (gh_n = h_{t-1} @ W_hn^T + b_hn: the reset gate scales b_hn too)
    h_t = (1 - z) * n + z * h_{t-1}
Host side (``gru_layer_forward`` / ``gru_layer_backward``): the input projection of all T steps is one
GEMM before the loop (b_hr and b_hz are folded into it; b_hn cannot be, it sits under r), the weight
gradients are single GEMMs over all T*B rows after it. Every tensor the kernels touch is contiguous
row-major; [B, X] arguments are slices ``buf[t]`` of [T, B, X] buffers.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels.common import mma, row_times_matrix, tanh, tile_offsets


@triton.jit
def gru_forward_step(gi_ptr, wt_ptr, b_hn_ptr, h_ptr, h_out_ptr, saved_ptr, B, H,
                     SAVE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One time step: recurrent GEMM + all gate math, for a [BLOCK_B, BLOCK_H] tile of (batch, hidden).

    gi_ptr     [B, 3H] x_t @ W_ih^T + b_ih + [b_hr, b_hz, 0], input dtype
    wt_ptr     [H, 3H] W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    b_hn_ptr   [H]     the recurrent bias of the n gate, input dtype
    h_ptr      [B, H]  h_{t-1}, input dtype (h0 or the previous output row y[t-1])
    h_out_ptr  [B, H]  h_t, written straight into the output y[t], input dtype
    saved_ptr  [B, 4H] saved for backward when SAVE: r, z, n and gh_n (= h_{t-1} W_hn^T + b_hn), input dtype
    Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)); each program owns all three gates of its hidden units.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 3 * H
    acc_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0)
        w = wt_ptr + ks[:, None] * G + cols[None, :]
        w_mask = (ks[:, None] < H) & (cols[None, :] < H)
        acc_r = mma(h, tl.load(w, mask=w_mask, other=0.0), acc_r, ALLOW_TF32)
        acc_z = mma(h, tl.load(w + H, mask=w_mask, other=0.0), acc_z, ALLOW_TF32)
        acc_n = mma(h, tl.load(w + 2 * H, mask=w_mask, other=0.0), acc_n, ALLOW_TF32)

    gate = rows[:, None] * G + cols[None, :]
    r = tl.sigmoid(acc_r + tl.load(gi_ptr + gate, mask=mask, other=0.0).to(tl.float32))
    z = tl.sigmoid(acc_z + tl.load(gi_ptr + gate + H, mask=mask, other=0.0).to(tl.float32))
    gh_n = acc_n + tl.load(b_hn_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    n = tanh(tl.load(gi_ptr + gate + 2 * H, mask=mask, other=0.0).to(tl.float32) + r * gh_n)
    unit = rows[:, None] * H + cols[None, :]
    h_prev = tl.load(h_ptr + unit, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_out_ptr + unit, ((1.0 - z) * n + z * h_prev).to(h_out_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        dtype = saved_ptr.dtype.element_ty
        four = rows[:, None] * (4 * H) + cols[None, :]
        tl.store(saved_ptr + four, r.to(dtype), mask=mask)
        tl.store(saved_ptr + four + H, z.to(dtype), mask=mask)
        tl.store(saved_ptr + four + 2 * H, n.to(dtype), mask=mask)
        tl.store(saved_ptr + four + 3 * H, gh_n.to(dtype), mask=mask)


@triton.jit
def gru_backward_step(dgh_next_ptr, w_ptr, dy_ptr, saved_ptr, h_prev_ptr, dhz_ptr, dgh_ptr, dn_ptr, B, H,
                      HAS_NEXT: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of backward through time: the recurrent dh GEMM fused with the gate-gradient math.

    dgh_next_ptr [B, 3H] dL/dgh at step t+1 (gradient of the recurrent projection; read if HAS_NEXT)
    w_ptr        [3H, H] W_hh as stored (row-major), input dtype
    dy_ptr       [B, H]  dL/dy_t from above
    saved_ptr    [B, 4H] r, z, n, gh_n saved by the forward step t
    h_prev_ptr   [B, H]  h_{t-1}
    dhz_ptr      [B, H]  fp32, updated in place: the direct path dL/dh_{t+1} * z_{t+1} on entry (the
                         wrapper seeds it with dL/dh_n), dL/dh_t * z_t on exit
    dgh_ptr      [B, 3H] out: dL/dgh_t = [dpre_r, dpre_z, dpre_n * r], input dtype
    dn_ptr       [B, H]  out: dL/dgi_n = dpre_n (dL/dgi_r, dL/dgi_z equal the first two blocks of dgh)
    dh_t = dy_t + dhz + dgh_{t+1} @ W_hh (K over all 3H) is computed for this tile's units, then the gate
    math; each program reads and writes only its own tile of dhz, so the in-place update is race-free.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 3 * H
    unit = rows[:, None] * H + cols[None, :]
    dh = tl.load(dy_ptr + unit, mask=mask, other=0.0).to(tl.float32) + tl.load(dhz_ptr + unit, mask=mask, other=0.0)
    if HAS_NEXT:
        acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        dh += row_times_matrix(dgh_next_ptr, G, w_ptr, H, rows, cols, B, G, H, acc,
                               ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)

    four = rows[:, None] * (4 * H) + cols[None, :]
    r = tl.load(saved_ptr + four, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(saved_ptr + four + H, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(saved_ptr + four + 2 * H, mask=mask, other=0.0).to(tl.float32)
    gh_n = tl.load(saved_ptr + four + 3 * H, mask=mask, other=0.0).to(tl.float32)
    h_prev = tl.load(h_prev_ptr + unit, mask=mask, other=0.0).to(tl.float32)
    dpre_n = dh * (1.0 - z) * (1.0 - n * n)
    dtype = dgh_ptr.dtype.element_ty
    gate = rows[:, None] * G + cols[None, :]
    tl.store(dgh_ptr + gate, (dpre_n * gh_n * r * (1.0 - r)).to(dtype), mask=mask)
    tl.store(dgh_ptr + gate + H, (dh * (h_prev - n) * z * (1.0 - z)).to(dtype), mask=mask)
    tl.store(dgh_ptr + gate + 2 * H, (dpre_n * r).to(dtype), mask=mask)
    tl.store(dn_ptr + unit, dpre_n.to(dtype), mask=mask)
    tl.store(dhz_ptr + unit, dh * z, mask=mask)


def gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, config, save):
    """One GRU layer over a whole sequence.

    x [T, B, E], h0 [B, H], weights in torch.nn layout, all of one dtype and device, contiguous;
    config: a LaunchConfig. Returns y [T, B, H] and saved [T, B, 4H] (r, z, n, gh_n; None unless
    ``save``). Launches: 1 GEMM + T step kernels.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    bias = b_ih + torch.cat([b_hh[:2 * H], torch.zeros_like(b_hh[2 * H:])])
    gi = torch.addmm(bias, x.reshape(T * B, E), w_ih.t()).view(T, B, 3 * H)
    wt = w_hh.t().contiguous()  # [H, 3H]: the step kernel reads W_hh^T tiles along contiguous rows
    b_hn = b_hh[2 * H:].contiguous()
    y = x.new_empty(T, B, H)
    saved = x.new_empty(T, B, 4 * H) if save else None
    launch = gru_forward_step[config.grid(B, H)]
    for t in range(T):
        # Without SAVE the kernel never touches saved_ptr; gi[t] only fills the argument slot.
        launch(gi[t], wt, b_hn, h0 if t == 0 else y[t - 1], y[t], saved[t] if save else gi[t], B, H,
               SAVE=save, **config.meta())
    return y, saved


def gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, dh_n, config):
    """Gradients of one GRU layer from what ``gru_layer_forward`` saved.

    dy [T, B, H], dh_n [B, H]: cotangents of y and of the final state. Returns
    (dx [T, B, E], dh0 [B, H], dW_ih, dW_hh, db_ih, db_hh). Launches: T step kernels, then GEMMs over all
    T*B rows with dGi = [dgh_r, dgh_z, dn] and dGh = dgh: dx = dGi W_ih, dW_ih = dGi^T X,
    dW_hh = dGh^T [h0; y[:-1]], db_ih / db_hh = column sums of dGi / dGh.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    dgh = x.new_empty(T, B, 3 * H)
    dn = x.new_empty(T, B, H)
    dhz = dh_n.float().clone()
    dy = dy.contiguous()
    launch = gru_backward_step[config.grid(B, H)]
    for t in reversed(range(T)):
        has_next = t < T - 1
        # At t = T-1 there is no step t+1: HAS_NEXT=False and dgh[t] only fills the argument slot.
        launch(dgh[t + 1] if has_next else dgh[t], w_hh, dy[t], saved[t], h0 if t == 0 else y[t - 1],
               dhz, dgh[t], dn[t], B, H, HAS_NEXT=has_next, **config.meta())
    dgh_rows = dgh.view(T * B, 3 * H)
    dgi_rows = torch.cat([dgh[..., :2 * H], dn], dim=2).view(T * B, 3 * H)
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).view(T * B, H)
    dh0 = (dgh[0] @ w_hh + dhz).to(h0.dtype)
    return ((dgi_rows @ w_ih).view(T, B, E), dh0, dgi_rows.t() @ x.reshape(T * B, E),
            dgh_rows.t() @ h_prev, dgi_rows.sum(0), dgh_rows.sum(0))
