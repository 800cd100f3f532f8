"""GRU kernels in Triton, per-step variant: one fused launch per time step forward, one per step backward.

Math and gate order are torch.nn's (fastlm.cells.math.gru_pointwise): rows of W_ih [3H, E] and
W_hh [3H, H] are the gates [r, z, n];
    r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)      (gh_n = h_{t-1} @ W_hn^T + b_hn: the reset gate scales b_hn too)
    h_t = (1 - z) * n + z * h_{t-1}
The time loops here (``gru_forward_steps`` / ``gru_backward_steps``, T launches) are what kernels/gru_layer.py
(the host side and the public ``gru``) runs per layer unless the persistent ones (kernels/gru_persistent.py,
one launch) are chosen. Every tensor the kernels touch is contiguous row-major. The step kernels take the
whole-sequence buffers and the step index t (see kernels/common.py): every launch of a sequence passes the
same tensors, only t (and, backward, HAS_NEXT at the last step) changes. ``config`` is a
fastlm.kernels.tiles.LaunchConfig (tile sizes and warps); ``allow_tf32`` lets fp32 GEMM tiles use TF32. The
tile functions (``gru_recurrent_chunks``, ``gru_cell_update``, ``gru_gate_gradients``) are shared with the
persistent kernels, so both variants compute the same math. Names: p_ pointers, b_ blocks (common.py).
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
def gru_recurrent_chunks(p_h, p_wt, rows, cols, B, H, H_CACHE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} @ W_hh^T for the three gates of the tile (rows, cols), reading K in BLOCK_K chunks.

    p_h        [B, H]     h_{t-1}, input dtype; rows >= B read as zeros
    p_wt       [H, 3H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    H_CACHE    the cache modifier of the loads of h (see row_times_matrix)
    Returns acc_r, acc_z, acc_n, each [BLOCK_B, BLOCK_H] fp32 (without b_hh).
    """
    G = 3 * H
    acc_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b_h = tl.load(p_h + rows[:, None] * H + ks[None, :],
                      mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0, cache_modifier=H_CACHE)
        p_w = p_wt + ks[:, None] * G + cols[None, :]
        w_mask = (ks[:, None] < H) & (cols[None, :] < H)
        acc_r = mma(b_h, tl.load(p_w, mask=w_mask, other=0.0), acc_r, ALLOW_TF32)
        acc_z = mma(b_h, tl.load(p_w + H, mask=w_mask, other=0.0), acc_z, ALLOW_TF32)
        acc_n = mma(b_h, tl.load(p_w + 2 * H, mask=w_mask, other=0.0), acc_n, ALLOW_TF32)
    return acc_r, acc_z, acc_n


@triton.jit
def gru_cell_update(acc_r, acc_z, acc_n, p_gi, p_bias_hn, p_h_prev, p_y, p_saved, t, B, H, rows, cols, mask,
                    SAVE: tl.constexpr):
    """The gate math of step t for the tile (rows, cols) whose recurrent products are acc_* [BLOCK_B, BLOCK_H]
    (fp32): adds the input projection and b_hn, activates and writes h_t (and what backward needs). Buffers
    as gru_forward_step's; p_h_prev [B, H] is h_{t-1}; mask [BLOCK_B, BLOCK_H] the tile's in-bounds mask."""
    G = 3 * H
    p_gi_t = sequence_row(p_gi, t, B * G)
    gate = rows[:, None] * G + cols[None, :]
    b_r = sigmoid(acc_r + tl.load(p_gi_t + gate, mask=mask, other=0.0).to(tl.float32))
    b_z = sigmoid(acc_z + tl.load(p_gi_t + gate + H, mask=mask, other=0.0).to(tl.float32))
    b_gh_n = acc_n + tl.load(p_bias_hn + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    b_n = tanh(tl.load(p_gi_t + gate + 2 * H, mask=mask, other=0.0).to(tl.float32) + b_r * b_gh_n)
    unit = rows[:, None] * H + cols[None, :]
    b_h_prev = tl.load(p_h_prev + unit, mask=mask, other=0.0).to(tl.float32)
    b_h_new = ((1.0 - b_z) * b_n + b_z * b_h_prev).to(p_y.dtype.element_ty)
    tl.store(sequence_row(p_y, t, B * H) + unit, b_h_new, mask=mask)
    if SAVE:
        p_saved_t = sequence_row(p_saved, t, B * 4 * H)
        dtype = p_saved.dtype.element_ty
        four = rows[:, None] * (4 * H) + cols[None, :]
        tl.store(p_saved_t + four, b_r.to(dtype), mask=mask)
        tl.store(p_saved_t + four + H, b_z.to(dtype), mask=mask)
        tl.store(p_saved_t + four + 2 * H, b_n.to(dtype), mask=mask)
        tl.store(p_saved_t + four + 3 * H, b_gh_n.to(dtype), mask=mask)


@triton.jit
def gru_gate_gradients(b_dh, p_dgh, p_saved, p_h0, p_y, p_dhz, p_dn, t, B, H, rows, cols, mask):
    """Backward gate math of step t for the tile (rows, cols), given b_dh = dL/dh_t [BLOCK_B, BLOCK_H] fp32
    (dy_t, the direct path dhz and the recurrent term, all summed): writes row t of dgh and dn and the tile
    of dhz (dL/dh_t * z_t). Buffers as gru_backward_step's; mask is the tile's in-bounds mask."""
    G = 3 * H
    unit = rows[:, None] * H + cols[None, :]
    p_saved_t = sequence_row(p_saved, t, B * 4 * H)
    four = rows[:, None] * (4 * H) + cols[None, :]
    b_r = tl.load(p_saved_t + four, mask=mask, other=0.0).to(tl.float32)
    b_z = tl.load(p_saved_t + four + H, mask=mask, other=0.0).to(tl.float32)
    b_n = tl.load(p_saved_t + four + 2 * H, mask=mask, other=0.0).to(tl.float32)
    b_gh_n = tl.load(p_saved_t + four + 3 * H, mask=mask, other=0.0).to(tl.float32)
    b_h_prev = tl.load(previous_row(p_h0, p_y, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
    b_dpre_n = b_dh * (1.0 - b_z) * (1.0 - b_n * b_n)
    p_dgh_t = sequence_row(p_dgh, t, B * G)
    dtype = p_dgh.dtype.element_ty
    gate = rows[:, None] * G + cols[None, :]
    tl.store(p_dgh_t + gate, (b_dpre_n * b_gh_n * b_r * (1.0 - b_r)).to(dtype), mask=mask)
    tl.store(p_dgh_t + gate + H, (b_dh * (b_h_prev - b_n) * b_z * (1.0 - b_z)).to(dtype), mask=mask)
    tl.store(p_dgh_t + gate + 2 * H, (b_dpre_n * b_r).to(dtype), mask=mask)
    tl.store(sequence_row(p_dn, t, B * H) + unit, b_dpre_n.to(dtype), mask=mask)
    tl.store(p_dhz + unit, b_dh * b_z, mask=mask)


@triton.jit(do_not_specialize=["t"])
def gru_forward_step(p_gi, p_wt, p_bias_hn, p_h0, p_y, p_saved, t, B, H,
                     SAVE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t: recurrent GEMM + all gate math, for a [BLOCK_B, BLOCK_H] tile of (batch, hidden).

    p_gi       [T, B, 3H] x @ W_ih^T + b_ih + [b_hr, b_hz, 0], input dtype; reads row t
    p_wt       [H, 3H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    p_bias_hn  [H]        the recurrent bias of the n gate, input dtype
    p_h0       [B, H]     the initial h, input dtype; read at t == 0
    p_y        [T, B, H]  the outputs, input dtype: reads h_{t-1} = row t-1 (t > 0), writes h_t to row t
    p_saved    [T, B, 4H] when SAVE, row t gets r, z, n and gh_n (= h_{t-1} W_hn^T + b_hn) for backward
    t          the step, a runtime int (not specialized: one compiled kernel serves every step)
    Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)); each program owns all three gates of its hidden units.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    p_h_prev = previous_row(p_h0, p_y, t, B * H)
    acc_r, acc_z, acc_n = gru_recurrent_chunks(p_h_prev, p_wt, rows, cols, B, H, "", ALLOW_TF32,
                                               BLOCK_B, BLOCK_H, BLOCK_K)
    gru_cell_update(acc_r, acc_z, acc_n, p_gi, p_bias_hn, p_h_prev, p_y, p_saved, t, B, H, rows, cols, mask, SAVE)


@triton.jit(do_not_specialize=["t"])
def gru_backward_step(p_dgh, p_w, p_dy, p_saved, p_h0, p_y, p_dhz, p_dn, t, B, H,
                      HAS_NEXT: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t of backward through time: the recurrent dh GEMM fused with the gate-gradient math.

    p_dgh      [T, B, 3H] dL/dgh (gradient of the recurrent projection), input dtype: reads row t+1 (when
                          HAS_NEXT), writes row t = [dpre_r, dpre_z, dpre_n * r]
    p_w        [3H, H]    W_hh as stored (row-major), input dtype
    p_dy       [T, B, H]  dL/dy from above; reads row t
    p_saved    [T, B, 4H] r, z, n, gh_n saved by the forward; reads row t
    p_h0       [B, H]     the initial h; read at t == 0
    p_y        [T, B, H]  the forward's outputs; reads h_{t-1} = row t-1 (t > 0)
    p_dhz      [B, H]     fp32, updated in place: the direct path dL/dh_{t+1} * z_{t+1} on entry (the
                          wrapper seeds it with dL/dh_n), dL/dh_t * z_t on exit
    p_dn       [T, B, H]  writes row t: dL/dgi_n = dpre_n (dL/dgi_r, dL/dgi_z equal the first two blocks of dgh)
    t          the step, a runtime int; HAS_NEXT is False only at the last step, t = T-1
    dh_t = dy_t + dhz + dgh_{t+1} @ W_hh (K over all 3H) is computed for this tile's units, then the gate
    math; each program reads and writes only its own tile of dhz, so the in-place update is race-free.
    """
    rows, cols, mask = tile_offsets(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    G = 3 * H
    unit = rows[:, None] * H + cols[None, :]
    b_dh = (tl.load(sequence_row(p_dy, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
            + tl.load(p_dhz + unit, mask=mask, other=0.0))
    if HAS_NEXT:
        acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        b_dh += row_times_matrix(sequence_row(p_dgh, t + 1, B * G), G, p_w, H, rows, cols, B, G, H, acc,
                                 "", ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    gru_gate_gradients(b_dh, p_dgh, p_saved, p_h0, p_y, p_dhz, p_dn, t, B, H, rows, cols, mask)


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


def gru_forward_scratch(B, H, dtype, device, config, allow_tf32):
    """A zero-argument launch of one forward step (t = 1 of 2, saving for backward: the training path) on
    scratch buffers of this shape: what the tile tuner times (fastlm.kernels.tiles)."""
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
