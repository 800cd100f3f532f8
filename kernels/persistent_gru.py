"""GRU layer in Triton, persistent variant: the whole sequence in one launch forward and one backward.

Same math, parameter layout, buffers and saved tensors as kernels/gru.py (whose tile functions these kernels
call: ``gru_recurrent_chunks``, ``gru_cell_update``, ``gru_gate_gradients``), and the same host side:
``gru_layer_forward`` / ``gru_layer_backward`` there take ``gru_forward_persistent_steps`` /
``gru_backward_persistent_steps`` from here as their time loop. The work split, the exchange of h and
dL/dgh through global memory behind the grid barrier, the resident W_hh slices (three gates here) and the
modes are those of kernels/persistent_lstm.py, whose docstring describes them.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels.common import (
    check_offsets,
    mma,
    previous_row,
    row_block,
    row_times_matrix,
    sequence_row,
    tile_offsets,
    weight_tile,
)
from fastlm.kernels.grid_barrier import (
    barrier_state,
    check_barrier,
    first_patience,
    launch_options,
    step_barrier,
)
from fastlm.kernels.gru import gru_cell_update, gru_gate_gradients, gru_recurrent_chunks


@triton.jit
def gru_resident_product(h_ptr, rows, B, H, w_r, w_z, w_n, ALLOW_TF32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1}[rows] @ the three resident gate slices w_* [BLOCK_K, BLOCK_H]: acc_r, acc_z, acc_n
    [BLOCK_B, BLOCK_H] fp32. h_ptr [B, H], written by every program: read through L2 (".cg")."""
    h = row_block(h_ptr, H, rows, B, H, ".cg", BLOCK_K)
    zeros = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    return mma(h, w_r, zeros, ALLOW_TF32), mma(h, w_z, zeros, ALLOW_TF32), mma(h, w_n, zeros, ALLOW_TF32)


@triton.jit
def gru_resident_dh(dgh_ptr, rows, B, H, v_r, v_z, v_n, ALLOW_TF32: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dgh_{t+1}[rows] @ W_hh[:, units] as the sum over the gates q of dgh_q [BLOCK_B, H] @ v_q, the
    resident [BLOCK_K, BLOCK_H] row slices of W_hh: [BLOCK_B, BLOCK_H] fp32. dgh_ptr: row t+1 of dgh,
    [B, 3H], written by every program: read through L2 (".cg")."""
    G = 3 * H
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc = mma(row_block(dgh_ptr, G, rows, B, H, ".cg", BLOCK_K), v_r, acc, ALLOW_TF32)
    acc = mma(row_block(dgh_ptr + H, G, rows, B, H, ".cg", BLOCK_K), v_z, acc, ALLOW_TF32)
    acc = mma(row_block(dgh_ptr + 2 * H, G, rows, B, H, ".cg", BLOCK_K), v_n, acc, ALLOW_TF32)
    return acc


@triton.jit(do_not_specialize=["T"])
def gru_forward_persistent(gi_ptr, wt_ptr, b_hn_ptr, h0_ptr, y_ptr, saved_ptr, sync_ptr, T, B, H,
                           SAVE: tl.constexpr, ALLOW_TF32: tl.constexpr, RESIDENT: tl.constexpr,
                           SINGLE_PROGRAM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """All T forward steps of one layer.

    gi_ptr     [T, B, 3H] x @ W_ih^T + b_ih + [b_hr, b_hz, 0], input dtype; step t reads row t
    wt_ptr     [H, 3H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    b_hn_ptr   [H]        the recurrent bias of the n gate, input dtype
    h0_ptr     [B, H]     the initial h, input dtype
    y_ptr      [T, B, H]  the outputs, input dtype: step t reads all of row t-1 (h_{t-1}), writes its units
                          of row t
    saved_ptr  [T, B, 4H] when SAVE, r, z, n and gh_n for backward, input dtype
    sync_ptr   [SYNC_WORDS] int32, zeroed: the grid barrier's state (unused when SINGLE_PROGRAM)
    T          the number of steps, a runtime int (not specialized)
    Grid: (P,), P = cdiv(H, BLOCK_H) programs (or 1 with SINGLE_PROGRAM); see kernels/persistent_lstm.py.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if RESIDENT:  # this program's one hidden block: its gate slices of W_hh^T, loaded once
        own = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        w_r = weight_tile(wt_ptr, 3 * H, own, H, BLOCK_K)
        w_z = weight_tile(wt_ptr + H, 3 * H, own, H, BLOCK_K)
        w_n = weight_tile(wt_ptr + 2 * H, 3 * H, own, H, BLOCK_K)
    patience = first_patience()
    for t in range(T):
        h_prev_ptr = previous_row(h0_ptr, y_ptr, t, B * H)
        for block in range(pid, tl.cdiv(H, BLOCK_H), programs):
            for batch_block in range(tl.cdiv(B, BLOCK_B)):
                rows, cols, mask = tile_offsets(batch_block, block, B, H, BLOCK_B, BLOCK_H)
                if RESIDENT:
                    acc_r, acc_z, acc_n = gru_resident_product(h_prev_ptr, rows, B, H, w_r, w_z, w_n, ALLOW_TF32,
                                                               BLOCK_B, BLOCK_H, BLOCK_K)
                else:
                    acc_r, acc_z, acc_n = gru_recurrent_chunks(h_prev_ptr, wt_ptr, rows, cols, B, H, ".cg",
                                                               ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                gru_cell_update(acc_r, acc_z, acc_n, gi_ptr, b_hn_ptr, h_prev_ptr, y_ptr, saved_ptr, t, B, H, rows,
                                cols, mask, SAVE)
        patience = step_barrier(sync_ptr, t, T, patience, SINGLE_PROGRAM)


@triton.jit(do_not_specialize=["T"])
def gru_backward_persistent(dgh_ptr, w_ptr, dy_ptr, saved_ptr, h0_ptr, y_ptr, dhz_ptr, dn_ptr, sync_ptr, T, B, H,
                            ALLOW_TF32: tl.constexpr, RESIDENT: tl.constexpr, SINGLE_PROGRAM: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """All T backward steps of one layer, t = T-1 down to 0.

    dgh_ptr    [T, B, 3H] dL/dgh, input dtype: step t reads all of row t+1, writes its units of row t
    w_ptr      [3H, H]    W_hh as stored (row-major), input dtype
    dy_ptr     [T, B, H]  dL/dy
    saved_ptr  [T, B, 4H] r, z, n, gh_n saved by the forward
    h0_ptr     [B, H]     the initial h
    y_ptr      [T, B, H]  the forward's outputs
    dhz_ptr    [B, H]     fp32, dL/dh_n on entry, dL/dh_0 * z_0 on exit (each program updates only its units)
    dn_ptr     [T, B, H]  dL/dgi_n, written row by row
    sync_ptr   [SYNC_WORDS] int32, zeroed: the grid barrier's state (unused when SINGLE_PROGRAM)
    T          the number of steps, a runtime int (not specialized)
    Grid as gru_forward_persistent's.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    G = 3 * H
    if RESIDENT:  # this program's one hidden block: the rows q*H + k, columns = its units, of W_hh per gate
        own = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        v_r = weight_tile(w_ptr, H, own, H, BLOCK_K)
        v_z = weight_tile(w_ptr + H * H, H, own, H, BLOCK_K)
        v_n = weight_tile(w_ptr + 2 * H * H, H, own, H, BLOCK_K)
    patience = first_patience()
    for step in range(T):
        t = T - 1 - step
        for block in range(pid, tl.cdiv(H, BLOCK_H), programs):
            for batch_block in range(tl.cdiv(B, BLOCK_B)):
                rows, cols, mask = tile_offsets(batch_block, block, B, H, BLOCK_B, BLOCK_H)
                unit = rows[:, None] * H + cols[None, :]
                dh = (tl.load(sequence_row(dy_ptr, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
                      + tl.load(dhz_ptr + unit, mask=mask, other=0.0))
                if t < T - 1:
                    if RESIDENT:
                        dh += gru_resident_dh(sequence_row(dgh_ptr, t + 1, B * G), rows, B, H, v_r, v_z, v_n,
                                              ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                    else:
                        dh += row_times_matrix(sequence_row(dgh_ptr, t + 1, B * G), G, w_ptr, H, rows, cols, B, G,
                                               H, tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32), ".cg",
                                               ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                gru_gate_gradients(dh, dgh_ptr, saved_ptr, h0_ptr, y_ptr, dhz_ptr, dn_ptr, t, B, H, rows, cols, mask)
        patience = step_barrier(sync_ptr, step, T, patience, SINGLE_PROGRAM)


def gru_forward_persistent_steps(gi, wt, b_hn, h0, y, saved, config, allow_tf32):
    """The forward time loop of one layer as one launch (buffers as gru_forward_persistent's; saved None:
    nothing saved). ``config``: a PersistentConfig."""
    T, B, H = y.shape
    check_offsets(B, H, 4)  # saved has 4H columns
    sync, barrier = barrier_state(gi, config, T)
    gru_forward_persistent[(config.programs,)](
        gi, wt, b_hn, h0, y, gi if saved is None else saved, sync, T, B, H, SAVE=saved is not None,
        ALLOW_TF32=allow_tf32, **launch_options(config))
    if barrier:
        check_barrier(sync)


def gru_backward_persistent_steps(dgh, w_hh, dy, saved, h0, y, dhz, dn, config, allow_tf32):
    """The backward time loop of one layer as one launch (buffers as gru_backward_persistent's)."""
    T, B, H = dy.shape
    check_offsets(B, H, 4)
    sync, barrier = barrier_state(dgh, config, T)
    gru_backward_persistent[(config.programs,)](
        dgh, w_hh, dy, saved, h0, y, dhz, dn, sync, T, B, H, ALLOW_TF32=allow_tf32, **launch_options(config))
    if barrier:
        check_barrier(sync)


def gru_persistent_compiled(B, H, dtype, device, config, allow_tf32):
    """{"forward": compiled kernel, "backward": compiled kernel} for this shape and config, compiled (not
    launched) with Triton's ``warmup``, as lstm_persistent_compiled. Compiled CUDA only."""
    def tensor(dtype_):
        return torch.empty(1, dtype=dtype_, device=device)  # a kernel compiles for dtypes, not shapes

    x, fp32, sync = tensor(dtype), tensor(torch.float32), tensor(torch.int32)
    grid = (config.programs,)
    meta = dict(ALLOW_TF32=allow_tf32, **launch_options(config))
    return {"forward": gru_forward_persistent.warmup(x, x, x, x, x, x, sync, 2, B, H, SAVE=True, grid=grid, **meta),
            "backward": gru_backward_persistent.warmup(x, x, x, x, x, x, fp32, x, sync, 2, B, H, grid=grid, **meta)}
