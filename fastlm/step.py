"""The training step: forward, backward, clip and update on one chunk, in the profiler's phases.

Shared by `fastlm train`, `fastlm bench` and `fastlm profile`, so the three measure the same work.
"""

from __future__ import annotations

import torch

from fastlm.model import RNNLM, detach_state
from fastlm.profiling import BACKWARD, CLIP, FORWARD, OPTIMIZER, PhaseTimer


class TrainStep:
    """One optimisation step on one chunk, in the phases the profiler reports (data is timed outside).

    Shared by `fastlm train`, `fastlm bench` and `fastlm profile` so they measure the same work.
    """

    def __init__(self, model: RNNLM, clip: float, lr: float):
        self.model = model
        self.params = list(model.parameters())  # tied weights appear once
        self.clip = clip
        self.optimizer = torch.optim.SGD(self.params, lr=lr)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.param_groups[0]["lr"] = value

    def __call__(self, inputs, targets, state, timer: PhaseTimer):
        with timer.phase(FORWARD):
            hidden, state = self.model(inputs, detach_state(state))
            loss = self.model.loss(hidden, targets)
        with timer.phase(BACKWARD):
            loss.backward()
        with timer.phase(CLIP):
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        with timer.phase(OPTIMIZER):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), state
