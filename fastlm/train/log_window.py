"""The steps between two log lines: their loss and non-finite count kept on the device, read once at the close.

Reading a device value waits for the device, so a step adds to the window without reading anything; the
trainer closes the window at the log interval (one host sync) and opens the next once the log line is out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from fastlm.timing import ALLREDUCE, PHASES, STEP
from fastlm.train.progress import perplexity


@dataclass(frozen=True)
class ClosedWindow:
    steps: int
    tokens: int
    seconds: float  # from the window's opening to its close
    bad: int  # steps with a non-finite loss or gradients
    first_bad: int  # the global step of the first of them, -1 when none
    loss: Optional[float]  # mean over the finite steps; None when every step was non-finite

    def record(self, epoch: int, batch: int, epoch_batches: int, step: int, lr: float, samples: dict) -> dict:
        """The window's "log" record for metrics.jsonl, at the step that closed it (``batch`` of the epoch's
        ``epoch_batches``); ``samples``: the phase timer's (ms per phase)."""
        phases = {name: _mean(samples.get(name)) for name in (*PHASES, STEP)}
        if ALLREDUCE in samples:  # several processes: the all-reduce that backward waited for (in backward's time)
            phases[ALLREDUCE] = _mean(samples[ALLREDUCE])
        return {"kind": "log", "epoch": epoch, "batch": batch, "epoch_batches": epoch_batches, "step": step,
                "loss": self.loss, "ppl": perplexity(self.loss) if self.loss is not None else None, "lr": lr,
                "ms_per_batch": 1e3 * self.seconds / self.steps, "tokens_per_s": self.tokens / self.seconds,
                "phases_ms": phases}


class LogWindow:
    def __init__(self, device: torch.device, skipping: bool):
        self.skipping = skipping  # --skip-nonfinite: a skipped step's loss stays out of the window's mean
        self.loss = torch.empty((), device=device)  # zeroed by open(), as each window starts
        self.bad = torch.empty((), device=device, dtype=torch.long)
        self.first_bad = torch.empty((), device=device, dtype=torch.long)
        self.open()

    def open(self) -> None:
        self.loss.zero_()
        self.bad.zero_()
        self.first_bad.fill_(-1)
        self.steps, self.tokens, self.started = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, step: int, finite: Optional[torch.Tensor] = None) -> None:
        """One step's loss (a device scalar) and tokens; ``finite``: the step's own verdict on its loss and
        gradients, when it keeps one (else the loss is checked)."""
        bad = ~(finite if finite is not None else torch.isfinite(loss))
        self.bad += bad
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        self.loss += torch.where(bad, 0.0, loss) if self.skipping else loss
        self.steps += 1
        self.tokens += tokens

    def close(self) -> ClosedWindow:
        """The window's figures (reads the device); ``open`` starts the next."""
        bad, first_bad = int(self.bad.item()), int(self.first_bad.item())
        loss = self.loss.item() / (self.steps - bad) if self.steps > bad else None
        return ClosedWindow(self.steps, self.tokens, time.perf_counter() - self.started, bad, first_bad, loss)


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None
