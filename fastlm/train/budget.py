"""When training ends before its epochs do: the --max-steps/--max-minutes budget and a stop request (a signal).

With several processes the clock and the signals differ between them, yet every rank must end at the same
step (the collectives after that point must match): the ranks agree on both, and each asks the agreement.
"""

from __future__ import annotations

import time

import torch

from fastlm.config import TrainConfig
from fastlm.distributed import World, sum_
from fastlm.train.signals import StopRequest


class Budget:
    def __init__(self, train: TrainConfig, stop: StopRequest, world: World, device: torch.device):
        self.train, self.stop, self.world, self.device = train, stop, world, device
        self._deadline = time.monotonic() + 60 * train.max_minutes if train.max_minutes else None
        self._agreed = {"stop": False, "deadline": False}  # with several processes: what all ranks agreed on
        # How often the ranks agree on stopping: every step on CPU (an 8-byte gloo all-reduce, ~0.1 ms against
        # steps of 10-1000 ms), so that a signal is obeyed before torchrun's 30 s shutdown grace runs out; on
        # CUDA at log intervals (agreeing reads a device value: a host sync, which the fast path avoids).
        self._agree_every_step = device.type != "cuda"

    def spent(self, step: int) -> bool:
        """``step`` steps done: --max-steps reached, or --max-minutes passed."""
        if self.train.max_steps is not None and step >= self.train.max_steps:
            return True
        if self.world.size > 1:
            return self._agreed["deadline"]
        return self._out_of_time()

    def stop_requested(self) -> bool:
        return self._agreed["stop"] if self.world.size > 1 else self.stop.requested

    def agree_when_due(self, batches_done: int, epoch_batches: int) -> None:
        """Several processes: every rank learns whether any was signalled or ran out of time, at the same step
        (every step on CPU; on CUDA at log intervals and at the epoch's end)."""
        due = (self._agree_every_step or batches_done % self.train.log_interval == 0
               or batches_done == epoch_batches)
        if self.world.size == 1 or not due:
            return
        stop, late = self.stop.requested, self._out_of_time()
        flags = torch.tensor([int(stop), int(late)], device=self.device)
        sum_(flags, self.world)
        self._agreed = {"stop": bool(flags[0].item()), "deadline": bool(flags[1].item())}
        if self._agreed["stop"] and not stop:
            self.stop.request()

    def _out_of_time(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline
