"""Evaluation, as the PyTorch example's evaluate(): the mean loss per target token over a split's first batches,
without gradients, the hidden state carried from batch to batch (or zeroed before each with --state reset);
and the standard error of that mean (fastlm.train.lr_rule). The sums stay on the device until the end.

With several processes each evaluates its share of the split's columns and the sums are added up.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastlm.config import TrainConfig
from fastlm.data.batching import BatchStreamer
from fastlm.distributed import World, sum_
from fastlm.model import RNNLM
from fastlm.train.lr_rule import validation_noise
from fastlm.train.progress import TrainDisplay
from fastlm.train.signals import StopRequest


class Evaluator:
    def __init__(self, model: RNNLM, device: torch.device, batch_size: int, train: TrainConfig,
                 display: TrainDisplay, world: World):
        self.model, self.device, self.batch_size, self.train = model, device, batch_size, train
        self.display, self.world = display, world

    def evaluate(self, stream: BatchStreamer, split: str, limit: int,
                 stop: Optional[StopRequest] = None) -> Optional[tuple[float, Optional[float]]]:
        """(mean loss, its standard error) over ``stream``'s first ``limit`` batches; None when ``stop`` was
        requested before the last. (Give ``stop`` in one process only: every rank must take part in the sum.)"""
        self.model.eval()
        sums = EvaluationSums(self.device)
        state = self.model.init_state(self.batch_size)
        with torch.no_grad(), self.display.evaluating(split, limit) as advance:
            for index, inputs, targets in stream.iterate(0, limit):
                if stop is not None and stop.requested:
                    self.model.train()
                    return None
                if self.train.state == "reset":
                    state = self.model.init_state(self.batch_size)
                hidden, state = self.model(inputs, state)
                sums.add(self.model.loss(hidden, targets), targets.numel())
                advance(index + 1)
        self.model.train()
        return sums.result(self.world)


class EvaluationSums:
    def __init__(self, device: torch.device):
        self.device = device
        self.total = torch.zeros((), device=device, dtype=torch.float64)
        self.squares = torch.zeros((), device=device, dtype=torch.float64)  # of batch losses: the noise
        self.tokens = self.batches = 0

    def add(self, batch_loss: torch.Tensor, tokens: int) -> None:
        """One batch's mean loss (a device scalar) over its ``tokens`` targets."""
        batch_loss = batch_loss.double()
        self.total += batch_loss * tokens
        self.squares += batch_loss * batch_loss * tokens
        self.tokens += tokens
        self.batches += 1

    def result(self, world: World) -> tuple[float, Optional[float]]:
        """(mean loss per target token, its standard error) over every rank's share of the batches."""
        total, squares, count, batches = self.total, self.squares, self.tokens, self.batches
        if world.size > 1:
            sums = torch.stack([total, squares, torch.tensor(float(count), device=self.device, dtype=torch.float64)])
            total, squares, count = sum_(sums, world).tolist()
            batches *= world.size  # each rank's share of a batch counts as a batch of its own
        else:
            total, squares = total.item(), squares.item()
        return total / count, validation_noise(total, squares, count, batches)
