"""The fast training step: forward, backward, clip and update on one chunk, in the profiler's phases.

What makes ``TrainStep`` fast, with the example's numbers up to float noise:
- no host synchronisation: the loss comes back as a device tensor for the caller to accumulate;
- the fused, chunked decoder + cross-entropy of fastlm.model.fused_loss (through ``RNNLM.loss``);
- clipping with foreach kernels where the device has them, the SGD update as one foreach call over all
  parameters (on CPU torch runs both per tensor with the same kernels: the numbers are the example's),
  and gradients dropped (set to None) instead of zeroed, so no pass over their memory;
- on CUDA: bf16 autocast as an option (``amp="bf16"``), and fixed-shape steps captured once as a CUDA
  graph and replayed (fastlm.step.cuda_graphs), the short last chunk of an epoch running eagerly.

Non-finite steps: every step leaves ``finite``, a device flag saying its loss and gradient norm were finite,
for the trainer to read at its log interval. With ``skip_nonfinite`` a step whose flag is false changes
nothing: its update is masked to zero and the hidden state it was given is carried on, all on the device
(no host sync, and it works inside a CUDA graph).
"""

from __future__ import annotations

import contextlib

import torch

from fastlm.model import RNNLM, detach_state, map_state
from fastlm.step.base import StepBase
from fastlm.step.cuda_graphs import GraphedStep
from fastlm.timing import BACKWARD, CLIP, EMBEDDING_GRAD, FORWARD, OPTIMIZER, PhaseTimer


class TrainStep(StepBase):
    """The fast step. ``step(inputs, targets, state, timer) -> (loss as a detached device tensor, state)``.

    ``amp="bf16"`` runs forward under bf16 autocast (a change of the numbers, opt-in); ``cuda_graphs``
    captures and replays full-size steps on a CUDA device (ignored elsewhere); ``skip_nonfinite`` makes a
    step with a non-finite loss or gradient a no-op (see the module doc).
    """

    def __init__(self, model: RNNLM, clip: float, lr: float, *, amp: str = "off", cuda_graphs: bool = False,
                 skip_nonfinite: bool = False):
        super().__init__(model, clip, lr)
        self.skip_nonfinite = skip_nonfinite
        if amp not in ("off", "bf16"):
            raise ValueError(f"amp must be 'off' or 'bf16', got {amp!r}")
        self.device = self.params[0].device
        self.amp = amp
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = GraphedStep(self)

    def autocast(self):
        if self.amp == "bf16":
            # No weight-cast cache: a cached cast would be stale inside a replayed CUDA graph.
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def __call__(self, inputs, targets, state, timer: PhaseTimer):
        if self.graphs is not None:
            return self.graphs(inputs, targets, state, timer)
        return self.eager(inputs, targets, state, timer)

    def eager(self, inputs, targets, state, timer: PhaseTimer):
        given_state = detach_state(state)
        with timer.phase(FORWARD):
            with self.autocast():
                hidden, state = self.model(inputs, given_state)
                loss = self.model.loss(hidden, targets)
        with timer.phase(BACKWARD):
            loss.backward()
            timer.split_rest(EMBEDDING_GRAD)
        loss = loss.detach()
        with timer.phase(CLIP):
            grad_norm = self.clip_gradients()
            self.finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        with timer.phase(OPTIMIZER):
            self.update()
        if self.skip_nonfinite:
            state = map_state(lambda new, old: torch.where(self.finite, new, old), state, given_state)
        return loss, state

    def clip_gradients(self) -> torch.Tensor:
        """Clips in place; returns the norm before clipping (a device tensor)."""
        # torch's own clip: per-tensor norms and one scale factor kept on the device, foreach kernels on
        # CUDA; on CPU (no foreach kernels) the same per-tensor kernels as the example's call.
        return torch.nn.utils.clip_grad_norm_(self.params, self.clip,
                                              foreach=True if self.device.type == "cuda" else None)

    @torch.no_grad()
    def update(self) -> None:
        """p -= lr * grad over all parameters at once, then drop the gradients (no pass over memory).

        With ``skip_nonfinite`` the gradients of a non-finite step are zeroed first, in place and on the
        device (a fill, not a product: 0 * NaN is NaN); they are dropped right after anyway.
        """
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if self.skip_nonfinite:
            bad = ~self.finite
            for g in grads:
                g.masked_fill_(bad, 0.0)
        torch._foreach_add_(params, grads, alpha=-self.lr)
        for p in self.params:
            p.grad = None
