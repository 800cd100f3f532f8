"""The fast step on several processes: torch's DistributedDataParallel around the model that computes.

DDP does what it always does: the same initial weights on every rank (broadcast from rank 0 when it wraps
the model), gradients averaged over the ranks in buckets, the all-reduce of each bucket launched as soon as
its gradients exist, so that it overlaps the rest of backward. The step adds three things:

- the model's loss is a method beside its forward (the fused decoder + cross-entropy): DDP only needs the
  forward to go through it (that is where it prepares the reduction); every parameter still receives its
  gradient in backward, which is all DDP's reducer waits for;
- the loss the step returns is averaged over the ranks (one small all-reduce, no host sync), so it is the
  one-process loss and every rank agrees on whether a step was finite;
- the timer: backward returns only when DDP's reduction is done, so the time from the last gradient to that
  return is the all-reduce that did not overlap backward: with the loss's own small all-reduce after it, the
  ``allreduce`` part of backward. A callback queued at backward's start runs after the last gradient and
  before DDP's own end-of-backward callback (autograd runs them in the order queued), and marks the end of
  the ``gradients`` part.

CUDA graphs are not used under DDP (a choice, said in how_it_ran): capturing DDP needs a static graph and
NCCL settings of its own, which this step does not set up. The adaptive decoder is refused: its unused
clusters leave parameters without gradients in some steps, which DDP cannot average without an extra
search of the graph at every step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastlm.distributed import World
from fastlm.errors import FastlmError
from fastlm.timing import ALLREDUCE, EMBEDDING_GRAD, GRADIENTS, PhaseTimer

GRAPHS_NOTE = "not used under torch.distributed: each process runs its steps eagerly"


class DataParallel:
    def __init__(self, model: torch.nn.Module, world: World, device: torch.device):
        if getattr(model, "adaptive", False):
            raise FastlmError("--decoder adaptive does not run on several processes yet (some of its clusters get no "
                              "gradient in a step, which DistributedDataParallel cannot average); use one process")
        self.world = world
        # The full-softmax model has no buffers, so DDP's default buffer synchronisation costs nothing.
        self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def forward(self, inputs, state):
        return self.module(inputs, state)

    def time_the_allreduce(self, loss: torch.Tensor, timer: PhaseTimer) -> None:
        """Before ``loss.backward()``: have the timer split backward into its gradients and the all-reduce
        after them (see the module doc). With backward's parts on (profile), the last part before the
        all-reduce is the embedding's gradient."""
        if not timer.enabled:
            return
        name = EMBEDDING_GRAD if timer.backward_parts else GRADIENTS
        engine = torch.autograd.Variable._execution_engine

        def at_backward_start(grad):
            engine.queue_callback(lambda: timer.split(name))
            return grad
        loss.register_hook(at_backward_start)

    @staticmethod
    def after_backward(timer: PhaseTimer) -> None:
        timer.split_rest(ALLREDUCE)

    def average(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss averaged over the ranks (each rank's is the mean over an equal share of the tokens)."""
        dist.all_reduce(loss)
        return loss.div_(self.world.size)
