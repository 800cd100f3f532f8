"""What every training step has: the parameters, the clipping norm, the optimizer and its learning rate.

Shared by the fast step (fastlm.step.fast) and the example's (fastlm.step.example).
"""

from __future__ import annotations

import torch

from fastlm.model import RNNLM
from fastlm.step.optimizer import OptimizerSpec, build_optimizer


class StepBase:
    """Parameters, clipping norm and optimizer, shared by the fast step and the example's.

    The optimizer object holds the learning rate (``lr``) and is what checkpoints save and restore. With
    plain SGD (the default) it has no per-parameter state and the update itself is done by the step; otherwise
    (AdamW, SGD with weight decay) the step calls it (fastlm.step.optimizer).
    """

    def __init__(self, model: RNNLM, clip: float, lr: float, precision: str = "fp32",
                 optimizer: OptimizerSpec = OptimizerSpec()):
        self.model = model
        self.precision = precision  # as asked (fastlm.precision); fastlm.step.how_it_ran says what ran
        self.params = list(model.parameters())  # tied weights appear once
        self.clip = clip
        self.optimizer = build_optimizer(self.params, optimizer, lr)
        self.plain_sgd = optimizer.plain_sgd
        # Device bool after each step: its loss and gradients were finite. None: the step does not say
        # (the example's), and the trainer checks the loss alone.
        self.finite: torch.Tensor | None = None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.param_groups[0]["lr"] = value
