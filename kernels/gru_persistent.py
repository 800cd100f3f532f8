"""GRU kernels in Triton, persistent variant: the whole sequence in one launch forward and one backward.

Same math, parameter layout, buffers and saved tensors as kernels/gru_step.py (whose tile functions these
kernels call: ``gru_recurrent_chunks``, ``gru_cell_update``, ``gru_gate_gradients``), and the same host
side: kernels/gru_layer.py runs ``gru_forward_persistent_steps`` / ``gru_backward_persistent_steps`` from
here as its time loop when this variant is chosen. The work split, the exchange of h and dL/dgh through
global memory behind the grid barrier, the resident W_hh slices (three gates here) and the modes are those
of kernels/lstm_persistent.py, whose docstring describes them. Names: p_ pointers, b_ blocks (common.py).
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
from fastlm.kernels.gru_step import gru_cell_update, gru_gate_gradients, gru_recurrent_chunks


@triton.jit
def gru_resident_product(p_h, rows, B, H, b_w_r, b_w_z, b_w_n, ALLOW_TF32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1}[rows] @ the three resident gate slices b_w_* [BLOCK_K, BLOCK_H]: acc_r, acc_z, acc_n
    [BLOCK_B, BLOCK_H] fp32. p_h [B, H], written by every program: read through L2 (".cg")."""
    b_h = row_block(p_h, H, rows, B, H, ".cg", BLOCK_K)
    zeros = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    return (mma(b_h, b_w_r, zeros, ALLOW_TF32), mma(b_h, b_w_z, zeros, ALLOW_TF32),
            mma(b_h, b_w_n, zeros, ALLOW_TF32))


@triton.jit
def gru_resident_dh(p_dgh, rows, B, H, b_v_r, b_v_z, b_v_n, ALLOW_TF32: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dgh_{t+1}[rows] @ W_hh[:, units] as the sum over the gates q of dgh_q [BLOCK_B, H] @ b_v_q, the
    resident [BLOCK_K, BLOCK_H] row slices of W_hh: [BLOCK_B, BLOCK_H] fp32. p_dgh: row t+1 of dgh,
    [B, 3H], written by every program: read through L2 (".cg")."""
    G = 3 * H
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc = mma(row_block(p_dgh, G, rows, B, H, ".cg", BLOCK_K), b_v_r, acc, ALLOW_TF32)
    acc = mma(row_block(p_dgh + H, G, rows, B, H, ".cg", BLOCK_K), b_v_z, acc, ALLOW_TF32)
    acc = mma(row_block(p_dgh + 2 * H, G, rows, B, H, ".cg", BLOCK_K), b_v_n, acc, ALLOW_TF32)
    return acc


@triton.jit(do_not_specialize=["T"])
def gru_forward_persistent(p_gi, p_wt, p_bias_hn, p_h0, p_y, p_saved, p_sync, T, B, H,
                           SAVE: tl.constexpr, ALLOW_TF32: tl.constexpr, RESIDENT: tl.constexpr,
                           SINGLE_PROGRAM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """All T forward steps of one layer.

    p_gi       [T, B, 3H] x @ W_ih^T + b_ih + [b_hr, b_hz, 0], input dtype; step t reads row t
    p_wt       [H, 3H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    p_bias_hn  [H]        the recurrent bias of the n gate, input dtype
    p_h0       [B, H]     the initial h, input dtype
    p_y        [T, B, H]  the outputs, input dtype: step t reads all of row t-1 (h_{t-1}), writes its units
                          of row t
    p_saved    [T, B, 4H] when SAVE, r, z, n and gh_n for backward, input dtype
    p_sync     [SYNC_WORDS] int32, zeroed: the grid barrier's state (unused when SINGLE_PROGRAM)
    T          the number of steps, a runtime int (not specialized)
    Grid: (P,), P = cdiv(H, BLOCK_H) programs (or 1 with SINGLE_PROGRAM); see kernels/lstm_persistent.py.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if RESIDENT:  # this program's one hidden block: its gate slices of W_hh^T, loaded once
        own = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        b_w_r = weight_tile(p_wt, 3 * H, own, H, BLOCK_K)
        b_w_z = weight_tile(p_wt + H, 3 * H, own, H, BLOCK_K)
        b_w_n = weight_tile(p_wt + 2 * H, 3 * H, own, H, BLOCK_K)
    patience = first_patience()
    for t in range(T):
        p_h_prev = previous_row(p_h0, p_y, t, B * H)
        for block in range(pid, tl.cdiv(H, BLOCK_H), programs):
            for batch_block in range(tl.cdiv(B, BLOCK_B)):
                rows, cols, mask = tile_offsets(batch_block, block, B, H, BLOCK_B, BLOCK_H)
                if RESIDENT:
                    acc_r, acc_z, acc_n = gru_resident_product(p_h_prev, rows, B, H, b_w_r, b_w_z, b_w_n,
                                                               ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                else:
                    acc_r, acc_z, acc_n = gru_recurrent_chunks(p_h_prev, p_wt, rows, cols, B, H, ".cg",
                                                               ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                gru_cell_update(acc_r, acc_z, acc_n, p_gi, p_bias_hn, p_h_prev, p_y, p_saved, t, B, H, rows,
                                cols, mask, SAVE)
        patience = step_barrier(p_sync, t, T, patience, SINGLE_PROGRAM)


@triton.jit(do_not_specialize=["T"])
def gru_backward_persistent(p_dgh, p_w, p_dy, p_saved, p_h0, p_y, p_dhz, p_dn, p_sync, T, B, H,
                            ALLOW_TF32: tl.constexpr, RESIDENT: tl.constexpr, SINGLE_PROGRAM: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """All T backward steps of one layer, t = T-1 down to 0.

    p_dgh      [T, B, 3H] dL/dgh, input dtype: step t reads all of row t+1, writes its units of row t
    p_w        [3H, H]    W_hh as stored (row-major), input dtype
    p_dy       [T, B, H]  dL/dy
    p_saved    [T, B, 4H] r, z, n, gh_n saved by the forward
    p_h0       [B, H]     the initial h
    p_y        [T, B, H]  the forward's outputs
    p_dhz      [B, H]     fp32, dL/dh_n on entry, dL/dh_0 * z_0 on exit (each program updates only its units)
    p_dn       [T, B, H]  dL/dgi_n, written row by row
    p_sync     [SYNC_WORDS] int32, zeroed: the grid barrier's state (unused when SINGLE_PROGRAM)
    T          the number of steps, a runtime int (not specialized)
    Grid as gru_forward_persistent's.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    G = 3 * H
    if RESIDENT:  # this program's one hidden block: the rows q*H + k, columns = its units, of W_hh per gate
        own = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        b_v_r = weight_tile(p_w, H, own, H, BLOCK_K)
        b_v_z = weight_tile(p_w + H * H, H, own, H, BLOCK_K)
        b_v_n = weight_tile(p_w + 2 * H * H, H, own, H, BLOCK_K)
    patience = first_patience()
    for step in range(T):
        t = T - 1 - step
        for block in range(pid, tl.cdiv(H, BLOCK_H), programs):
            for batch_block in range(tl.cdiv(B, BLOCK_B)):
                rows, cols, mask = tile_offsets(batch_block, block, B, H, BLOCK_B, BLOCK_H)
                unit = rows[:, None] * H + cols[None, :]
                b_dh = (tl.load(sequence_row(p_dy, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
                        + tl.load(p_dhz + unit, mask=mask, other=0.0))
                if t < T - 1:
                    if RESIDENT:
                        b_dh += gru_resident_dh(sequence_row(p_dgh, t + 1, B * G), rows, B, H, b_v_r, b_v_z,
                                                b_v_n, ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                    else:
                        b_dh += row_times_matrix(sequence_row(p_dgh, t + 1, B * G), G, p_w, H, rows, cols, B, G,
                                                 H, tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32), ".cg",
                                                 ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                gru_gate_gradients(b_dh, p_dgh, p_saved, p_h0, p_y, p_dhz, p_dn, t, B, H, rows, cols, mask)
        patience = step_barrier(p_sync, step, T, patience, SINGLE_PROGRAM)


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
