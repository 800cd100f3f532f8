"""The fast training step: forward, backward, clip and update on one chunk, in the profiler's phases.

What makes ``TrainStep`` fast, with the example's numbers up to float noise:
- no host synchronisation: the loss comes back as a device tensor for the caller to accumulate;
- the fused, chunked decoder + cross-entropy of fastlm.model.fused_loss (through ``RNNLM.loss``);
- clipping with foreach kernels where the device has them, the SGD update as one foreach call over all
  parameters (on CPU torch runs both per tensor with the same kernels: the numbers are the example's),
  and gradients dropped (set to None) instead of zeroed, so no pass over their memory; AdamW (opt-in)
  through torch's fused kernels where the device has them (fastlm.step.optimizer);
- ``precision="bf16"``: the decoder's three GEMMs (the step's costly part) run in bf16 inside the fused
  loss, all else in fp32 (fastlm.precision; docs/semantics.md); fp32 and tf32 differ only in torch's TF32
  switches, which the caller sets;
- on CUDA: fixed-shape steps captured once as a CUDA graph and replayed (fastlm.step.cuda_graphs), the
  short last chunk of an epoch running eagerly. The adaptive decoder is never captured: it picks the tokens
  of each cluster with ``nonzero()``, a host synchronisation that capture forbids.

Non-finite steps: every step leaves ``finite``, a device flag saying its loss and gradient norm were finite,
for the trainer to read at its log interval. With ``skip_nonfinite`` a step whose flag is false changes
nothing: its update is masked to zero and the hidden state it was given is carried on, all on the device
(no host sync, and it works inside a CUDA graph).
"""

from __future__ import annotations

import torch

from fastlm.distributed import SINGLE, World
from fastlm.errors import FastlmError
from fastlm.model import RNNLM, detach_state, map_state
from fastlm.precision import PRECISIONS, compute_dtype, resolve_precision
from fastlm.step.base import StepBase
from fastlm.step.cuda_graphs import GraphedStep
from fastlm.step.data_parallel import GRAPHS_NOTE, DataParallel
from fastlm.step.optimizer import OptimizerSpec, implementation
from fastlm.timing import BACKWARD, CLIP, EMBEDDING_GRAD, FORWARD, OPTIMIZER, PhaseTimer


class TrainStep(StepBase):
    """The fast step. ``step(inputs, targets, state, timer) -> (loss as a detached device tensor, state)``.

    ``precision="bf16"`` runs the decoder's GEMMs in bf16 (a change of the numbers, opt-in; see the module
    doc); ``cuda_graphs`` captures and replays full-size steps on a CUDA device (ignored elsewhere,
    and for the adaptive decoder: ``graphs_skipped`` says why); ``skip_nonfinite`` makes a step with a
    non-finite loss or gradient a no-op (see the module doc). With a ``world`` of several processes the
    model computes under DistributedDataParallel (fastlm.step.data_parallel).
    """

    def __init__(self, model: RNNLM, clip: float, lr: float, *, precision: str = "fp32",
                 cuda_graphs: bool = False, skip_nonfinite: bool = False, world: World = SINGLE,
                 optimizer: OptimizerSpec = OptimizerSpec()):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        device = next(model.parameters()).device
        self.precision_asked = precision
        precision, self.precision_reason = resolve_precision(precision, device)
        super().__init__(model, clip, lr, precision, optimizer)
        if skip_nonfinite and not (self.plain_sgd or implementation(self.optimizer, False) == "fused"):
            raise FastlmError(f"--skip-nonfinite with --optimizer {optimizer.name} needs torch's fused kernels, "
                              f"which skip a step on the device; torch has none for {device.type}")
        self.skip_nonfinite = skip_nonfinite
        self.device = device
        self.decoder_dtype = compute_dtype(precision)
        self.data_parallel = DataParallel(model, world, self.device) if world.size > 1 else None
        self.graphs = None
        self.graphs_skipped = None  # why CUDA graphs were asked for and not used, else None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs_skipped = GRAPHS_NOTE if self.data_parallel else graph_blocker(model)
            if self.graphs_skipped is None:
                self.graphs = GraphedStep(self)
                capturable(self.optimizer)

    def __call__(self, inputs, targets, state, timer: PhaseTimer):
        if self.graphs is not None:
            return self.graphs(inputs, targets, state, timer)
        return self.eager(inputs, targets, state, timer)

    def eager(self, inputs, targets, state, timer: PhaseTimer):
        given_state = detach_state(state)
        model = self.model
        with timer.phase(FORWARD):
            parallel = self.data_parallel
            hidden, state = parallel.forward(inputs, given_state) if parallel else model(inputs, given_state)
            loss = model.loss(hidden, targets, self.decoder_dtype)
        with timer.phase(BACKWARD):
            if parallel:
                parallel.time_the_allreduce(loss, timer)
            loss.backward()
            loss = loss.detach()
            if parallel:
                loss = parallel.average(loss)
                parallel.after_backward(timer)
            else:
                timer.split_rest(EMBEDDING_GRAD)
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
        """p -= lr * grad over all parameters at once, then drop the gradients (no pass over memory); or
        torch's optimizer step (AdamW, SGD with weight decay).

        With ``skip_nonfinite`` the gradients of a non-finite step are zeroed first, in place and on the
        device (a fill, not a product: 0 * NaN is NaN); they are dropped right after anyway. torch's fused
        optimizer is told instead (``found_inf``), and leaves weights, moments and step count untouched.
        """
        if not self.plain_sgd:
            if self.skip_nonfinite:
                self.optimizer.found_inf = (~self.finite).float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if self.skip_nonfinite:
            bad = ~self.finite
            for g in grads:
                g.masked_fill_(bad, 0.0)
        torch._foreach_add_(params, grads, alpha=-self.lr)
        for p in self.params:
            p.grad = None


def capturable(optimizer: torch.optim.Optimizer) -> None:
    """Lets torch's optimizer (AdamW, SGD with weight decay) be captured in the step's CUDA graph: its step
    counts live on the device and it checks nothing on the host. The few eager steps (warm-up, the short last
    chunk of an epoch) run correctly with the same setting; torch's warning that an uncaptured capturable step
    may be slower is expected here, so it is turned off."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    optimizer._warned_capturable_if_run_uncaptured = True


def graph_blocker(model: RNNLM) -> str | None:
    """Why the model's step cannot be captured as a CUDA graph, or None when it can."""
    if model.adaptive:
        return "the adaptive decoder picks each cluster's tokens with nonzero(), a host sync capture forbids"
    return None
