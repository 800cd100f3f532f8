"""The GRU op: one layer of torch.nn.GRU on the Triton kernels, differentiable; the public ``gru`` at the end.

Shapes: x [T, B, E], h0 [B, H], weights in torch.nn.GRU's layout and gate order r, z, n (w_ih [3H, E],
w_hh [3H, H], b_ih and b_hh [3H]), y [T, B, H], h_n [B, H]; all of one device and dtype.
Forward: the input projection of all T steps is one GEMM before the time loop (b_hr and b_hz folded into
it; b_hn cannot be, it sits under r), then the time loop, one of two variants with the same math and
buffers: kernels/gru_step.py (T launches) or kernels/gru_persistent.py (one launch), chosen with their tiles
by fastlm.kernels.launch. Backward: the time loop in reverse, then the weight gradients as single GEMMs
over all T*B rows. Saved for backward: x, h0, the weights, y and r, z, n, gh_n [T, B, 4H]. This file is
host code only: the kernels (and triton) are imported at the first call, which decides whether they run
compiled (CUDA) or through Triton's interpreter (CPU tensors).
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.kernels.launch import check_tensors, check_variant, kernel_modules, on_device, plan_layer
from fastlm.kernels.tiles import LaunchConfig


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


class GRULayer(torch.autograd.Function):
    """(x, h0, W_ih, W_hh, b_ih, b_hh, launch) -> (y, h_n) for one layer, ``launch`` a
    fastlm.kernels.launch.LayerLaunch (the time loops); saves x, h0, the weights, y and r, z, n, gh_n."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, launch):
        y, saved = gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, launch.forward, save=True)
        ctx.launch = launch
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, saved)
        return y, y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, w_ih, w_hh, y, saved = ctx.saved_tensors
        grads = gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, dh_n, ctx.launch.backward)
        return (*grads, None)


def gru(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
        b_hh: torch.Tensor, *, variant: str = "auto", tiles: Optional[LaunchConfig] = None,
        ran: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer over a sequence on the Triton kernels: torch.nn.GRU's math, forward and backward.

    Args:
        x: [T, B, E] the inputs.
        h0: [B, H] the initial hidden state.
        w_ih, w_hh, b_ih, b_hh: [3H, E], [3H, H], [3H], [3H]: torch.nn.GRU's weight_ih_l0, weight_hh_l0,
            bias_ih_l0, bias_hh_l0 (gates r, z, n).
        variant: "per-step" (a launch per time step), "persistent" (one launch per sequence, where its grid
            fits the GPU; else per-step, saying why) or "auto" (the rule of fastlm.kernels.launch).
        tiles: a LaunchConfig forcing every kernel's tiles (kernel authors, tests); None: tuned per shape.
        ran: a dict that gets, per kernel run ("gru_forward", and "gru_backward" when a gradient is needed),
            its variant, why, its tiles and their source (fastlm.kernels.launch.plan_layer).
        All tensors share one device (CUDA: compiled; CPU: Triton's interpreter, slow) and one dtype (fp32,
        fp16 or bf16; bf16 not interpreted).

    Returns:
        (y, h_n): y [T, B, H] the hidden state after every step, h_n [B, H] the last one. Differentiable in
        every argument tensor when autograd asks for it.

    Example:
        >>> rnn = torch.nn.GRU(5, 7)
        >>> x, h0 = torch.randn(3, 2, 5), torch.zeros(2, 7)
        >>> y, h_n = gru(x, h0, *rnn.parameters())  # rnn(x, h0[None]) up to float rounding
    """
    check_variant(variant)
    w_ih, w_hh, b_ih, b_hh = (w.contiguous() for w in (w_ih, w_hh, b_ih, b_hh))
    x, h0 = x.contiguous(), h0.contiguous()
    check_tensors((x, h0, w_ih, b_ih, b_hh), w_hh, kernel_modules().interpreted)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    with on_device(x):
        launch = plan_layer("gru", x, w_hh.shape[1], variant, tiles, needs_grad, ran)
        if needs_grad:
            return GRULayer.apply(x, h0, w_ih, w_hh, b_ih, b_hh, launch)
        y, _ = gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, launch.forward, save=False)
        return y, y[-1]
