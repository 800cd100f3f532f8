"""The LSTM op: one layer of torch.nn.LSTM on the Triton kernels, differentiable; the public ``lstm`` at the end.

Shapes: x [T, B, E], h0 and c0 [B, H], weights in torch.nn.LSTM's layout and gate order i, f, g, o
(w_ih [4H, E], w_hh [4H, H], b_ih and b_hh [4H]), y [T, B, H], h_n and c_n [B, H]; all of one device and
dtype (the cell state is kept in fp32 inside). Forward: the input projection of all T steps is one GEMM
before the time loop (both biases folded in), then the time loop, one of two variants with the same math and
buffers: kernels/lstm_step.py (T launches) or kernels/lstm_persistent.py (one launch), chosen with their
tiles by fastlm.kernels.launch. Backward: the time loop in reverse, then the weight gradients as single GEMMs
over all T*B rows. Saved for backward: x, h0, c0, the weights, y, every c_t (fp32) and the activated gates
[T, B, 4H]. This file is host code only: the kernels (and triton) are imported at the first call, which
decides whether they run compiled (CUDA) or through Triton's interpreter (CPU tensors).
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.kernels.launch import check_tensors, check_variant, kernel_modules, on_device, plan_layer
from fastlm.kernels.tiles import LaunchConfig


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


class LSTMLayer(torch.autograd.Function):
    """(x, h0, c0, W_ih, W_hh, b_ih, b_hh, launch) -> (y, h_n, c_n) for one layer, ``launch`` a
    fastlm.kernels.launch.LayerLaunch (the time loops); saves x, h0, c0, the weights, y, every c_t (fp32) and
    the activated gates [T, B, 4H]."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch):
        y, cs, gates = lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch.forward, save=True)
        ctx.launch = launch
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cs, gates)
        return y, y[-1].clone(), cs[-1].to(x.dtype, copy=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, y, cs, gates = ctx.saved_tensors
        grads = lstm_layer_backward(x, h0, c0, w_ih, w_hh, y, cs, gates, dy, dh_n, dc_n, ctx.launch.backward)
        return (*grads, None)


def lstm(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
         b_ih: torch.Tensor, b_hh: torch.Tensor, *, variant: str = "auto", tiles: Optional[LaunchConfig] = None,
         ran: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer over a sequence on the Triton kernels: torch.nn.LSTM's math, forward and backward.

    Args:
        x: [T, B, E] the inputs.
        h0, c0: [B, H] the initial hidden and cell states.
        w_ih, w_hh, b_ih, b_hh: [4H, E], [4H, H], [4H], [4H]: torch.nn.LSTM's weight_ih_l0, weight_hh_l0,
            bias_ih_l0, bias_hh_l0 (gates i, f, g, o).
        variant: "per-step" (a launch per time step), "persistent" (one launch per sequence, where its grid
            fits the GPU; else per-step, saying why) or "auto" (the rule of fastlm.kernels.launch).
        tiles: a LaunchConfig forcing every kernel's tiles (kernel authors, tests); None: tuned per shape.
        ran: a dict that gets, per kernel run ("lstm_forward", and "lstm_backward" when a gradient is
            needed), its variant, why, its tiles and their source (fastlm.kernels.launch.plan_layer).
        All tensors share one device (CUDA: compiled; CPU: Triton's interpreter, slow) and one dtype (fp32,
        fp16 or bf16; bf16 not interpreted).

    Returns:
        (y, h_n, c_n): y [T, B, H] the hidden state after every step, h_n and c_n [B, H] the last hidden and
        cell states. Differentiable in every argument tensor when autograd asks for it.

    Example:
        >>> rnn = torch.nn.LSTM(5, 7)
        >>> x, h0, c0 = torch.randn(3, 2, 5), torch.zeros(2, 7), torch.zeros(2, 7)
        >>> y, h_n, c_n = lstm(x, h0, c0, *rnn.parameters())  # rnn(x, (h0[None], c0[None])) up to rounding
    """
    check_variant(variant)
    w_ih, w_hh, b_ih, b_hh = (w.contiguous() for w in (w_ih, w_hh, b_ih, b_hh))
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    check_tensors((x, h0, c0, w_ih, b_ih, b_hh), w_hh, kernel_modules().interpreted)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    with on_device(x):
        launch = plan_layer("lstm", x, w_hh.shape[1], variant, tiles, needs_grad, ran)
        if needs_grad:
            return LSTMLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch)
        y, cs, _ = lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, launch.forward, save=False)
        return y, y[-1], cs[-1].to(x.dtype)
