"""LSTM layer in Triton, persistent variant: the whole sequence in one launch forward and one backward.

Same math, parameter layout, buffers and saved tensors as kernels/lstm_step.py (whose tile functions these
kernels call), and the same host side: kernels/lstm_layer.py runs ``lstm_forward_persistent_steps`` /
``lstm_backward_persistent_steps`` as its time loop when this variant is chosen; each program walks t.
P programs (``config``, a fastlm.kernels.tiles.PersistentConfig, chooses P, the tiles and the mode): program p
owns hidden blocks p, p + P, ... of BLOCK_H units, all four gates of them for every batch row (BLOCK_B rows at
a time), so the cell update stays local. Multi-program: one block each (P = cdiv(H, BLOCK_H), at most one
program per SM); single-program mode (P = 1) loops over every block. Step t reads all of h_{t-1} (forward) or
dL/dpre_{t+1} (backward) from the whole-sequence outputs after the grid barrier that ends each step
(kernels/grid_barrier.py); c (dc) goes through its global buffer, each program reading back its own units.
RESIDENT (BLOCK_K >= H, one block per program): the program loads its four [BLOCK_K, BLOCK_H] W_hh slices once
(forward: columns q*H + units of W_hh^T; backward: rows q*H + k of W_hh, its units as columns), else re-reads
them each step in BLOCK_K chunks. SINGLE_PROGRAM (no atomics; the interpreter's mode) and RESIDENT are
constexprs; launches use num_stages=1. Why: docs/semantics.md, "Tiles: the persistent rule and the per-step tuner".
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
from fastlm.kernels.lstm_step import lstm_cell_update, lstm_gate_gradients, lstm_recurrent_chunks


@triton.jit
def lstm_resident_product(p_h, rows, B, H, b_w_i, b_w_f, b_w_g, b_w_o, ALLOW_TF32: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1}[rows] @ the four resident gate slices b_w_* [BLOCK_K, BLOCK_H]: acc_i, acc_f, acc_g, acc_o
    [BLOCK_B, BLOCK_H] fp32. p_h [B, H], written by every program: read through L2 (".cg")."""
    b_h = row_block(p_h, H, rows, B, H, ".cg", BLOCK_K)
    zeros = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    return (mma(b_h, b_w_i, zeros, ALLOW_TF32), mma(b_h, b_w_f, zeros, ALLOW_TF32),
            mma(b_h, b_w_g, zeros, ALLOW_TF32), mma(b_h, b_w_o, zeros, ALLOW_TF32))


@triton.jit
def lstm_resident_dh(p_dgates, rows, B, H, b_v_i, b_v_f, b_v_g, b_v_o, ALLOW_TF32: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dpre_{t+1}[rows] @ W_hh[:, units] as the sum over the gates q of dpre_q [BLOCK_B, H] @ b_v_q, the
    resident [BLOCK_K, BLOCK_H] row slices of W_hh: [BLOCK_B, BLOCK_H] fp32. p_dgates: row t+1 of
    dgates, [B, 4H], written by every program: read through L2 (".cg")."""
    G = 4 * H
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc = mma(row_block(p_dgates, G, rows, B, H, ".cg", BLOCK_K), b_v_i, acc, ALLOW_TF32)
    acc = mma(row_block(p_dgates + H, G, rows, B, H, ".cg", BLOCK_K), b_v_f, acc, ALLOW_TF32)
    acc = mma(row_block(p_dgates + 2 * H, G, rows, B, H, ".cg", BLOCK_K), b_v_g, acc, ALLOW_TF32)
    acc = mma(row_block(p_dgates + 3 * H, G, rows, B, H, ".cg", BLOCK_K), b_v_o, acc, ALLOW_TF32)
    return acc


@triton.jit(do_not_specialize=["T"])
def lstm_forward_persistent(p_gi, p_wt, p_h0, p_y, p_c0, p_cs, p_gates, p_sync, T, B, H,
                            SAVE_GATES: tl.constexpr, ALLOW_TF32: tl.constexpr, RESIDENT: tl.constexpr,
                            SINGLE_PROGRAM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """All T forward steps of one layer.

    p_gi       [T, B, 4H] x @ W_ih^T + b_ih + b_hh, input dtype; step t reads row t
    p_wt       [H, 4H]    W_hh transposed, input dtype (columns q*H + j hold gate q of unit j)
    p_h0       [B, H]     the initial h, input dtype
    p_y        [T, B, H]  the outputs, input dtype: step t reads all of row t-1 (h_{t-1}), writes its units
                          of row t
    p_c0       [B, H]     the initial c, fp32
    p_cs       [T, B, H]  every c_t, fp32 (each program reads and writes only its own units)
    p_gates    [T, B, 4H] when SAVE_GATES, the activated i, f, g, o, input dtype
    p_sync     [SYNC_WORDS] int32, zeroed: the grid barrier's state (unused when SINGLE_PROGRAM)
    T          the number of steps, a runtime int (not specialized)
    Grid: (P,), P = cdiv(H, BLOCK_H) programs (or 1 with SINGLE_PROGRAM); see the module docstring.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if RESIDENT:  # this program's one hidden block: its gate slices of W_hh^T, loaded once
        own = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        b_w_i = weight_tile(p_wt, 4 * H, own, H, BLOCK_K)
        b_w_f = weight_tile(p_wt + H, 4 * H, own, H, BLOCK_K)
        b_w_g = weight_tile(p_wt + 2 * H, 4 * H, own, H, BLOCK_K)
        b_w_o = weight_tile(p_wt + 3 * H, 4 * H, own, H, BLOCK_K)
    patience = first_patience()
    for t in range(T):
        p_h_prev = previous_row(p_h0, p_y, t, B * H)
        for block in range(pid, tl.cdiv(H, BLOCK_H), programs):
            for batch_block in range(tl.cdiv(B, BLOCK_B)):
                rows, cols, mask = tile_offsets(batch_block, block, B, H, BLOCK_B, BLOCK_H)
                if RESIDENT:
                    acc_i, acc_f, acc_g, acc_o = lstm_resident_product(p_h_prev, rows, B, H, b_w_i, b_w_f, b_w_g,
                                                                       b_w_o, ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                else:
                    acc_i, acc_f, acc_g, acc_o = lstm_recurrent_chunks(p_h_prev, p_wt, rows, cols, B, H, ".cg",
                                                                       ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                lstm_cell_update(acc_i, acc_f, acc_g, acc_o, p_gi, p_y, p_c0, p_cs, p_gates, t, B, H,
                                 rows, cols, mask, SAVE_GATES)
        patience = step_barrier(p_sync, t, T, patience, SINGLE_PROGRAM)


@triton.jit(do_not_specialize=["T"])
def lstm_backward_persistent(p_dgates, p_w, p_dy, p_dh_n, p_gates, p_c0, p_cs, p_dc, p_sync,
                             T, B, H, ALLOW_TF32: tl.constexpr, RESIDENT: tl.constexpr,
                             SINGLE_PROGRAM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """All T backward steps of one layer, t = T-1 down to 0.

    p_dgates   [T, B, 4H] dL/dpre, input dtype: step t reads all of row t+1, writes its units of row t
    p_w        [4H, H]    W_hh as stored (row-major), input dtype
    p_dy       [T, B, H]  dL/dy, input dtype
    p_dh_n     [B, H]     dL/dh_n, input dtype; read at t = T-1 in place of the recurrent term
    p_gates    [T, B, 4H] the activated gates saved by the forward
    p_c0       [B, H]     the initial c, fp32
    p_cs       [T, B, H]  every c_t, fp32
    p_dc       [B, H]     fp32, dL/dc_n on entry, dL/dc_0 on exit (each program updates only its units)
    p_sync     [SYNC_WORDS] int32, zeroed: the grid barrier's state (unused when SINGLE_PROGRAM)
    T          the number of steps, a runtime int (not specialized)
    Grid as lstm_forward_persistent's.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    G = 4 * H
    if RESIDENT:  # this program's one hidden block: the rows q*H + k, columns = its units, of W_hh per gate
        own = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        b_v_i = weight_tile(p_w, H, own, H, BLOCK_K)
        b_v_f = weight_tile(p_w + H * H, H, own, H, BLOCK_K)
        b_v_g = weight_tile(p_w + 2 * H * H, H, own, H, BLOCK_K)
        b_v_o = weight_tile(p_w + 3 * H * H, H, own, H, BLOCK_K)
    patience = first_patience()
    for step in range(T):
        t = T - 1 - step
        for block in range(pid, tl.cdiv(H, BLOCK_H), programs):
            for batch_block in range(tl.cdiv(B, BLOCK_B)):
                rows, cols, mask = tile_offsets(batch_block, block, B, H, BLOCK_B, BLOCK_H)
                unit = rows[:, None] * H + cols[None, :]
                b_dh = tl.load(sequence_row(p_dy, t, B * H) + unit, mask=mask, other=0.0).to(tl.float32)
                if t < T - 1:
                    if RESIDENT:
                        b_dh += lstm_resident_dh(sequence_row(p_dgates, t + 1, B * G), rows, B, H, b_v_i, b_v_f,
                                                 b_v_g, b_v_o, ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                    else:
                        b_dh += row_times_matrix(sequence_row(p_dgates, t + 1, B * G), G, p_w, H, rows, cols, B,
                                                 G, H, tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32), ".cg",
                                                 ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
                else:
                    b_dh += tl.load(p_dh_n + unit, mask=mask, other=0.0).to(tl.float32)
                lstm_gate_gradients(b_dh, p_dgates, p_gates, p_c0, p_cs, p_dc, t, B, H, rows, cols, mask)
        patience = step_barrier(p_sync, step, T, patience, SINGLE_PROGRAM)


def lstm_forward_persistent_steps(gi, wt, h0, y, c0, cs, gates, config, allow_tf32):
    """The forward time loop of one layer as one launch (buffers as lstm_forward_persistent's; gates None:
    nothing saved). ``config``: a PersistentConfig. Launches: 1 (+ 1 memset and the barrier check with a
    grid barrier)."""
    T, B, H = y.shape
    check_offsets(B, H, 4)
    sync, barrier = barrier_state(gi, config, T)
    lstm_forward_persistent[(config.programs,)](
        gi, wt, h0, y, c0, cs, gi if gates is None else gates, sync, T, B, H, SAVE_GATES=gates is not None,
        ALLOW_TF32=allow_tf32, **launch_options(config))
    if barrier:
        check_barrier(sync)


def lstm_backward_persistent_steps(dgates, w_hh, dy, dh_n, gates, c0, cs, dc, config, allow_tf32):
    """The backward time loop of one layer as one launch (buffers as lstm_backward_persistent's)."""
    T, B, H = dy.shape
    check_offsets(B, H, 4)
    sync, barrier = barrier_state(dgates, config, T)
    lstm_backward_persistent[(config.programs,)](
        dgates, w_hh, dy, dh_n, gates, c0, cs, dc, sync, T, B, H, ALLOW_TF32=allow_tf32, **launch_options(config))
    if barrier:
        check_barrier(sync)


def lstm_persistent_compiled(B, H, dtype, device, config, allow_tf32):
    """{"forward": compiled kernel, "backward": compiled kernel} for this shape and config, compiled (not
    launched) with Triton's ``warmup``: what the co-residency check inspects. The forward is the training
    one (saving gates); the no-grad forward needs a subset of its registers. Compiled CUDA only."""
    def tensor(dtype_):
        return torch.empty(1, dtype=dtype_, device=device)  # a kernel compiles for dtypes, not shapes

    x, fp32, sync = tensor(dtype), tensor(torch.float32), tensor(torch.int32)
    grid = (config.programs,)
    meta = dict(ALLOW_TF32=allow_tf32, **launch_options(config))
    return {"forward": lstm_forward_persistent.warmup(x, x, x, x, fp32, fp32, x, sync, 2, B, H, SAVE_GATES=True,
                                                      grid=grid, **meta),
            "backward": lstm_backward_persistent.warmup(x, x, x, x, x, fp32, fp32, fp32, sync, 2, B, H, grid=grid,
                                                        **meta)}
