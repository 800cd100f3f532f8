"""GRU layer in Triton: one fused launch per time step forward, one per step backward (the per-step variant;
kernels/persistent_gru.py walks the whole sequence in one launch with the same cell math, from here).

Math and gate order are torch.nn's (fastlm.cells.math.gru_pointwise): rows of W_ih [3H, E] and
W_hh [3H, H] are the gates [r, z, n];
    r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)      (gh_n = h_{t-1} @ W_hn^T + b_hn: the reset gate scales b_hn too)
    h_t = (1 - z) * n + z * h_{t-1}
Host side (``gru_layer_forward`` / ``gru_layer_backward``): the input projection of all T steps is one
GEMM before the time loop (b_hr and b_hz are folded into it; b_hn cannot be, it sits under r), the weight
gradients are single GEMMs over all T*B rows after it; the time loop itself is the ``steps`` function the
caller passes: ``gru_forward_steps`` / ``gru_backward_steps`` here (T launches), or the persistent ones (one
launch). Every tensor the kernels touch is contiguous row-major. The step kernels take the whole-sequence
buffers and the step index t (see kernels/common.py): every launch of a sequence passes the same tensors,
only t (and, backward, HAS_NEXT at the last step) changes. ``config`` is a
fastlm.cells.triton_tiles.LaunchConfig (tile sizes and warps); ``allow_tf32`` lets fp32 GEMM tiles use
TF32. The tile functions (``gru_recurrent_chunks``, ``gru_cell_update``, ``gru_gate_gradients``) are shared
with the persistent kernels, so both variants compute the same math.
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
def gru_recurrent_chunks(h_ptr, wt_ptr, rows, cols, B, H, H_CACHE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} @ W_hh^T for the three gates of the tile (rows, cols), reading K in BLOCK_K chunks.

    h_ptr      [B, H]     h_{t-1}, input dtype; rows >= B read as zeros
    wt_ptr     [H, 3H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    H_CACHE    the cache modifier of the loads of h (see row_times_matrix)
    Returns acc_r, acc_z, acc_n, each [BLOCK_B, BLOCK_H] fp32 (without b_hh).
    """
    G = 3 * H
    acc_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0, cache_modifier=H_CACHE)
        w = wt_ptr + ks[:, None] * G + cols[None, :]
        w_mask = (ks[:, None] < H) & (cols[None, :] < H)
        acc_r = mma(h, tl.load(w, mask=w_mask, other=0.0), acc_r, ALLOW_TF32)
        acc_z = mma(h, tl.load(w + H, mask=w_mask, other=0.0), acc_z, ALLOW_TF32)
        acc_n = mma(h, tl.load(w + 2 * H, mask=w_mask, other=0.0), acc_n, ALLOW_TF32)
    return acc_r, acc_z, acc_n


@triton.jit
def gru_cell_update(acc_r, acc_z, acc_n, gi_ptr, b_hn_ptr, h_prev_ptr, y_ptr, saved_ptr, t, B, H, rows, cols, mask,
                    SAVE: tl.constexpr):
    """The gate math of step t for the tile (rows, cols) whose recurrent products are acc_* [BLOCK_B, BLOCK_H]
    (fp32): adds the input projection and b_hn, activates and writes h_t (and what backward needs). Buffers
    as gru_forward_step's; h_prev_ptr [B, H] is h_{t-1}; mask [BLOCK_B, BLOCK_H] the tile's in-bounds mask."""
    G = 3 * H
    gi = sequence_row(gi_ptr, t, B * G)
    gate = rows[:, None] * G + cols[None, :]
    r = sigmoid(acc_r + tl.load(gi + gate, mask=mask, other=0.0).to(tl.float32))
    z = sigmoid(acc_z + tl.load(gi + gate + H, mask=mask, other=0.0).to(tl.float32))
    gh_n = acc_n + tl.load(b_hn_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    n = tanh(tl.load(gi + gate + 2 * H, mask=mask, other=0.0).to(tl.float32) + r * gh_n)
    unit = rows[:, None] * H + cols[None, :]
    h_prev = tl.load(h_prev_ptr + unit, mask=mask, other=0.0).to(tl.float32)
    h_new = ((1.0 - z) * n + z * h_prev).to(y_ptr.dtype.element_ty)
    tl.store(sequence_row(y_ptr, t, B * H) + unit, h_new, mask=mask)
    if SAVE:
        saved = sequence_row(saved_ptr, t, B * 4 * H)
        dtype = saved_ptr.dtype.element_ty
        four = rows[:, None] * (4 * H) + cols[None, :]
        tl.store(saved + four, r.to(dtype), mask=mask)
        tl.store(saved + four + H, z.to(dtype), mask=mask)
        tl.store(saved + four + 2 * H, n.to(dtype), mask=mask)
        tl.store(saved + four + 3 * H, gh_n.to(dtype), mask=mask)


@triton.jit
def gru_gate_gradients(dh, dgh_ptr, saved_ptr, h0_ptr, y_ptr, dhz_ptr, dn_ptr, t, B, H, rows, cols, mask):
    """Backward gate math of step t for the tile (rows, cols), given dh = dL/dh_t [BLOCK_B, BLOCK_H] fp32
    (dy_t, the direct path dhz and the recurrent term, all summed): writes row t of dgh and dn and the tile
    of dhz (dL/dh_t * z_t). Buffers as gru_backward_step's; mask is the tile's in-bounds mask."""
    G = 3 * H
    unit = rows[:, None] * H + cols[None, :]
    saved = sequence_row(saved_ptr, t, B * 4 * H)
    four = rows[:, None] * (4 * H) + cols[None, :]
    r = tl.load(saved + four, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(saved + four + H, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(saved + four + 2 * H, mask=mask, other=0.0).to(tl.float32)
    gh_n = tl.load(saved + four + 3 * H, mask=mask, other=0.0).to(tl.float32)
    h_prev = tl.load(previous_row(h0_ptr, y_ptr, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
    dpre_n = dh * (1.0 - z) * (1.0 - n * n)
    dgh = sequence_row(dgh_ptr, t, B * G)
    dtype = dgh_ptr.dtype.element_ty
    gate = rows[:, None] * G + cols[None, :]
    tl.store(dgh + gate, (dpre_n * gh_n * r * (1.0 - r)).to(dtype), mask=mask)
    tl.store(dgh + gate + H, (dh * (h_prev - n) * z * (1.0 - z)).to(dtype), mask=mask)
    tl.store(dgh + gate + 2 * H, (dpre_n * r).to(dtype), mask=mask)
    tl.store(sequence_row(dn_ptr, t, B * H) + unit, dpre_n.to(dtype), mask=mask)
    tl.store(dhz_ptr + unit, dh * z, mask=mask)


@triton.jit(do_not_specialize=["t"])
def gru_forward_step(gi_ptr, wt_ptr, b_hn_ptr, h0_ptr, y_ptr, saved_ptr, t, B, H,
                     SAVE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t: recurrent GEMM + all gate math, for a [BLOCK_B, BLOCK_H] tile of (batch, hidden).

    gi_ptr     [T, B, 3H] x @ W_ih^T + b_ih + [b_hr, b_hz, 0], input dtype; reads row t
    wt_ptr     [H, 3H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    b_hn_ptr   [H]        the recurrent bias of the n gate, input dtype
    h0_ptr     [B, H]     the initial h, input dtype; read at t == 0
    y_ptr      [T, B, H]  the outputs, input dtype: reads h_{t-1} = row t-1 (t > 0), writes h_t to row t
    saved_ptr  [T, B, 4H] when SAVE, row t gets r, z, n and gh_n (= h_{t-1} W_hn^T + b_hn) for backward
    t          the step, a runtime int (not specialized: one compiled kernel serves every step)
    Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)); each program owns all three gates of its hidden units.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    h_prev_ptr = previous_row(h0_ptr, y_ptr, t, B * H)
    acc_r, acc_z, acc_n = gru_recurrent_chunks(h_prev_ptr, wt_ptr, rows, cols, B, H, "", ALLOW_TF32,
                                               BLOCK_B, BLOCK_H, BLOCK_K)
    gru_cell_update(acc_r, acc_z, acc_n, gi_ptr, b_hn_ptr, h_prev_ptr, y_ptr, saved_ptr, t, B, H, rows, cols, mask,
                    SAVE)


@triton.jit(do_not_specialize=["t"])
def gru_backward_step(dgh_ptr, w_ptr, dy_ptr, saved_ptr, h0_ptr, y_ptr, dhz_ptr, dn_ptr, t, B, H,
                      HAS_NEXT: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t of backward through time: the recurrent dh GEMM fused with the gate-gradient math.

    dgh_ptr    [T, B, 3H] dL/dgh (gradient of the recurrent projection), input dtype: reads row t+1 (when
                          HAS_NEXT), writes row t = [dpre_r, dpre_z, dpre_n * r]
    w_ptr      [3H, H]    W_hh as stored (row-major), input dtype
    dy_ptr     [T, B, H]  dL/dy from above; reads row t
    saved_ptr  [T, B, 4H] r, z, n, gh_n saved by the forward; reads row t
    h0_ptr     [B, H]     the initial h; read at t == 0
    y_ptr      [T, B, H]  the forward's outputs; reads h_{t-1} = row t-1 (t > 0)
    dhz_ptr    [B, H]     fp32, updated in place: the direct path dL/dh_{t+1} * z_{t+1} on entry (the
                          wrapper seeds it with dL/dh_n), dL/dh_t * z_t on exit
    dn_ptr     [T, B, H]  writes row t: dL/dgi_n = dpre_n (dL/dgi_r, dL/dgi_z equal the first two blocks of dgh)
    t          the step, a runtime int; HAS_NEXT is False only at the last step, t = T-1
    dh_t = dy_t + dhz + dgh_{t+1} @ W_hh (K over all 3H) is computed for this tile's units, then the gate
    math; each program reads and writes only its own tile of dhz, so the in-place update is race-free.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 3 * H
    unit = rows[:, None] * H + cols[None, :]
    dh = (tl.load(sequence_row(dy_ptr, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
          + tl.load(dhz_ptr + unit, mask=mask, other=0.0))
    if HAS_NEXT:
        acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        dh += row_times_matrix(sequence_row(dgh_ptr, t + 1, B * G), G, w_ptr, H, rows, cols, B, G, H, acc,
                               "", ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    gru_gate_gradients(dh, dgh_ptr, saved_ptr, h0_ptr, y_ptr, dhz_ptr, dn_ptr, t, B, H, rows, cols, mask)


def gru_forward_launcher(gi, wt, b_hn, h0, y, saved, config, allow_tf32):
    """launch(t): runs the forward step kernel for step t on these buffers (shapes as gru_forward_step's;
    saved None: nothing saved). Everything but t is bound here, once per sequence."""
    B, H = h0.shape
    check_offsets(B, H, 4)  # saved has 4H columns
    kernel = gru_forward_step[config.grid(B, H)]
    meta = dict(SAVE=saved is not None, ALLOW_TF32=allow_tf32, **config.meta())
    saved = gi if saved is None else saved  # without SAVE only fills the argument slot

    def launch(t: int) -> None:
        kernel(gi, wt, b_hn, h0, y, saved, t, B, H, **meta)

    return launch


def gru_backward_launcher(dgh, w_hh, dy, saved, h0, y, dhz, dn, config, allow_tf32):
    """launch(t): runs the backward step kernel for step t on these buffers (shapes as gru_backward_step's).
    HAS_NEXT follows from t: False at the last step only."""
    T, B, H = dy.shape
    check_offsets(B, H, 4)
    kernel = gru_backward_step[config.grid(B, H)]
    meta = dict(ALLOW_TF32=allow_tf32, **config.meta())

    def launch(t: int) -> None:
        kernel(dgh, w_hh, dy, saved, h0, y, dhz, dn, t, B, H, HAS_NEXT=t < T - 1, **meta)

    return launch


def gru_forward_steps(gi, wt, b_hn, h0, y, saved, config, allow_tf32):
    """The forward time loop of one layer as T step launches (buffers as gru_forward_step's)."""
    launch = gru_forward_launcher(gi, wt, b_hn, h0, y, saved, config, allow_tf32)
    for t in range(gi.shape[0]):
        launch(t)


def gru_backward_steps(dgh, w_hh, dy, saved, h0, y, dhz, dn, config, allow_tf32):
    """The backward time loop of one layer as T step launches, last step first (buffers as
    gru_backward_step's)."""
    launch = gru_backward_launcher(dgh, w_hh, dy, saved, h0, y, dhz, dn, config, allow_tf32)
    for t in reversed(range(dy.shape[0])):
        launch(t)


def gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, steps, save):
    """One GRU layer over a whole sequence.

    x [T, B, E], h0 [B, H], weights in torch.nn layout, all of one dtype and device, contiguous.
    steps(gi, wt, b_hn, h0, y, saved) runs the time loop (``gru_forward_steps`` with its config bound, or
    the persistent one). Returns y [T, B, H] and saved [T, B, 4H] (r, z, n, gh_n; None unless ``save``).
    Launches: 1 GEMM + the time loop's.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    bias = b_ih + torch.cat([b_hh[:2 * H], torch.zeros_like(b_hh[2 * H:])])
    gi = torch.addmm(bias, x.reshape(T * B, E), w_ih.t()).view(T, B, 3 * H)
    wt = w_hh.t().contiguous()  # [H, 3H]: the kernels read W_hh^T tiles along contiguous rows
    y = x.new_empty(T, B, H)
    saved = x.new_empty(T, B, 4 * H) if save else None
    steps(gi, wt, b_hh[2 * H:].contiguous(), h0, y, saved)
    return y, saved


def gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, dh_n, steps):
    """Gradients of one GRU layer from what ``gru_layer_forward`` saved.

    dy [T, B, H], dh_n [B, H]: cotangents of y and of the final state. steps(dgh, w_hh, dy, saved, h0, y,
    dhz, dn) runs the backward time loop (``gru_backward_steps`` bound, or the persistent one). Returns
    (dx [T, B, E], dh0 [B, H], dW_ih, dW_hh, db_ih, db_hh). Launches: the time loop's, then GEMMs over all
    T*B rows with dGi = [dgh_r, dgh_z, dn] and dGh = dgh: dx = dGi W_ih, dW_ih = dGi^T X,
    dW_hh = dGh^T [h0; y[:-1]], db_ih / db_hh = column sums of dGi / dGh.
    """
    T, B, E = x.shape
    H = w_hh.shape[1]
    dgh = x.new_empty(T, B, 3 * H)
    dn = x.new_empty(T, B, H)
    dhz = dh_n.float().clone()
    steps(dgh, w_hh, dy.contiguous(), saved, h0, y, dhz, dn)
    dgh_rows = dgh.view(T * B, 3 * H)
    dgi_rows = torch.cat([dgh[..., :2 * H], dn], dim=2).view(T * B, 3 * H)
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).view(T * B, H)
    dh0 = (dgh[0] @ w_hh + dhz).to(h0.dtype)
    return ((dgi_rows @ w_ih).view(T, B, E), dh0, dgi_rows.t() @ x.reshape(T * B, E),
            dgh_rows.t() @ h_prev, dgi_rows.sum(0), dgh_rows.sum(0))


def gru_forward_scratch(B, H, dtype, device, config, allow_tf32):
    """A zero-argument launch of one forward step (t = 1 of 2, saving for backward: the training path) on
    scratch buffers of this shape: what the tile tuner times (fastlm.cells.triton_tiles)."""
    rand = scratch(dtype, device)
    launch = gru_forward_launcher(rand(2, B, 3 * H), rand(H, 3 * H), rand(H), rand(B, H), rand(2, B, H),
                                  rand(2, B, 4 * H), config, allow_tf32)
    return lambda: launch(1)


def gru_backward_scratch(B, H, dtype, device, config, allow_tf32):
    """A zero-argument launch of one backward step (t = 0 of 2, with the recurrent GEMM: every step but the
    last) on scratch buffers of this shape: what the tile tuner times."""
    rand = scratch(dtype, device)
    launch = gru_backward_launcher(rand(2, B, 3 * H), rand(3 * H, H), rand(2, B, H), rand(2, B, 4 * H), rand(B, H),
                                   rand(2, B, H), rand(B, H, fp32=True), rand(2, B, H), config, allow_tf32)
    return lambda: launch(0)
