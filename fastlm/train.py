"""The trainer: the PyTorch word_language_model example's semantics, timed in phases.

Semantics kept exactly (DESIGN.md): hidden state carried across batches and detached each batch, mean
cross-entropy, clip_grad_norm_(clip), plain SGD p -= lr * grad, validation after each epoch, best model
saved when validation improves and lr /= 4 when it does not, test loss of the best model at the end.
The loss is accumulated on the device and read once per log interval, not once per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm.checkpoint import load_checkpoint, save_checkpoint
from fastlm.config import RunConfig
from fastlm.data.batching import BatchStreamer, batchify, check_bptt
from fastlm.display import TrainDisplay, perplexity
from fastlm.errors import FastlmError
from fastlm.model import RNNLM
from fastlm.profiling import DATA, PHASES, STEP, PhaseTimer, active_timer
from fastlm.step import TrainStep
from fastlm.runs import RunFolder

DRY_RUN_STEPS = 2  # --dry-run: train and evaluate this many batches of each split, one epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastlmError(f"--device {name} was asked for but this torch build or machine has no CUDA device; "
                          f"use --device cpu or auto")
    return torch.device(name)


@dataclass
class TrainResult:
    best_val_loss: Optional[float]
    test_loss: Optional[float]
    steps: int
    interrupted: bool


class Trainer:
    def __init__(self, config: RunConfig, corpus, device: torch.device, display: TrainDisplay,
                 on_step: Optional[Callable[[int, torch.Tensor], None]] = None):
        self.config, self.corpus, self.device, self.display = config, corpus, device, display
        self.run: Optional[RunFolder] = None  # set by fit(), so bad shapes fail before a folder exists
        self.on_step = on_step  # called with (global step, detached loss tensor); for tests and tools
        d, t = config.data, config.train
        train = batchify(corpus.train, d.batch_size, "train")
        check_bptt(train, d.bptt, "train")
        valid = batchify(corpus.valid, d.eval_batch_size, "valid")
        test = batchify(corpus.test, d.eval_batch_size, "test")
        self.train_stream = BatchStreamer(train, d.bptt, device)
        self.valid_stream = BatchStreamer(valid, d.bptt, device)
        self.test_stream = BatchStreamer(test, d.bptt, device)
        torch.manual_seed(t.seed)
        self.model = RNNLM(len(corpus.vocab), config.model).to(device)
        self.step_fn = TrainStep(self.model, t.clip, t.lr)
        self.timer = PhaseTimer(device)
        self.global_step = 0
        self.best_val_loss: Optional[float] = None
        self._deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None

    # ------------------------------------------------------------------ bookkeeping
    def _budget_spent(self) -> bool:
        t = self.config.train
        if t.max_steps is not None and self.global_step >= t.max_steps:
            return True
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _checkpoint(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "config": self.config.to_dict(),
                "vocab": list(self.corpus.vocab.idx2word), "vocab_digest": self.corpus.vocab.digest(),
                "epoch": epoch, "step": self.global_step, "lr": self.step_fn.lr,
                "best_val_loss": self.best_val_loss}

    # ------------------------------------------------------------------ loops
    def evaluate(self, stream: BatchStreamer) -> float:
        """Mean loss per target token over a split (the example's evaluate())."""
        self.model.eval()
        limit = DRY_RUN_STEPS if self.config.train.dry_run else len(stream)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        state = self.model.init_state(self.config.data.eval_batch_size)
        with torch.no_grad():
            for index, inputs, targets in stream.iterate():
                if index >= limit:
                    break
                hidden, state = self.model(inputs, state)
                total += self.model.loss(hidden, targets).double() * targets.numel()
                count += targets.numel()
        self.model.train()
        return total.item() / count

    def train_epoch(self, epoch: int) -> None:
        t = self.config.train
        stream = self.train_stream
        limit = DRY_RUN_STEPS if t.dry_run else len(stream)
        state = self.model.init_state(self.config.data.batch_size)
        self.model.train()
        self.display.start_epoch(epoch, limit)
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        self.timer.reset()
        batches = stream.iterate()
        for batch in range(1, limit + 1):
            with self.timer.step():
                with self.timer.phase(DATA):
                    _, inputs, targets = next(batches)
                with active_timer(self.timer):
                    loss, state = self.step_fn(inputs, targets, state, self.timer)
            window_loss += loss
            window_steps += 1
            window_tokens += targets.numel()
            self.global_step += 1
            if self.on_step is not None:
                self.on_step(self.global_step, loss)
            self.display.advance(batch)
            last = batch == limit or self._budget_spent()
            if batch % t.log_interval == 0 or last:
                self._log_window(epoch, batch, limit, window_loss, window_steps, window_tokens, window_start)
                window_loss.zero_()
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
            if last:
                break

    def _log_window(self, epoch, batch, total, window_loss, steps, tokens, started) -> None:
        samples = self.timer.collect()  # on CUDA this waits for the window's work: the one sync per window
        loss = window_loss.item() / steps
        seconds = time.perf_counter() - started
        record = {"kind": "log", "epoch": epoch, "batch": batch, "step": self.global_step,
                  "loss": loss, "ppl": perplexity(loss), "lr": self.step_fn.lr,
                  "ms_per_batch": 1e3 * seconds / steps, "tokens_per_s": tokens / seconds,
                  "phases_ms": {name: _mean(samples.get(name)) for name in (*PHASES, STEP)}}
        self.timer.reset()
        self.run.append_metrics(record)
        self.display.log(record, total)

    def fit(self, run: RunFolder) -> TrainResult:
        self.run = run
        t = self.config.train
        epochs = 1 if t.dry_run else t.epochs
        interrupted = False
        try:
            for epoch in range(1, epochs + 1):
                started = time.perf_counter()
                self.train_epoch(epoch)
                val_loss = self.evaluate(self.valid_stream)
                improved = self.best_val_loss is None or val_loss < self.best_val_loss
                if improved:
                    self.best_val_loss = val_loss
                    save_checkpoint(self.run.best, self._checkpoint(epoch))
                else:
                    self.step_fn.lr /= 4.0
                record = {"kind": "epoch", "epoch": epoch, "step": self.global_step, "val_loss": val_loss,
                          "val_ppl": perplexity(val_loss), "seconds": time.perf_counter() - started,
                          "best": improved, "lr_next": self.step_fn.lr}
                self.run.append_metrics(record)
                self.display.epoch_summary(record)
                save_checkpoint(self.run.last, self._checkpoint(epoch))
                if self._budget_spent():
                    self.display.message(f"stopping after {self.global_step} steps: the --max-steps/--max-minutes "
                                         f"budget is spent")
                    break
        except KeyboardInterrupt:
            interrupted = True
            self.display.message("[bold yellow]Exiting from training early (Ctrl-C)[/]")
        test_loss = self.test_best()
        return TrainResult(self.best_val_loss, test_loss, self.global_step, interrupted)

    def test_best(self) -> Optional[float]:
        """Loads the best checkpoint, reports its test loss and ppl, and records them."""
        if not self.run.best.is_file():
            self.display.message("no best model yet (no epoch finished its validation): nothing to test")
            return None
        self.model.load_state_dict(load_checkpoint(self.run.best)["model"])
        test_loss = self.evaluate(self.test_stream)
        self.run.append_metrics({"kind": "test", "test_loss": test_loss, "test_ppl": perplexity(test_loss),
                                 "step": self.global_step})
        self.display.message(f"[bold]End of training | test loss {test_loss:5.2f} | "
                             f"test ppl {perplexity(test_loss):8.2f}[/]")
        if self.config.train.save:
            save_checkpoint(self.config.train.save, load_checkpoint(self.run.best))
        return test_loss


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None


def run_training(config: RunConfig) -> int:
    """`fastlm train`: data, model, run folder, training, test; returns the exit status."""
    from fastlm.data import resolve_corpus
    from fastlm.runs import unique_run_dir

    device = resolve_device(config.train.device)
    display = TrainDisplay()
    corpus = resolve_corpus(config.data.data, console=display.console)
    trainer = Trainer(config, corpus, device, display)
    m = config.model
    run = RunFolder(config.train.run_dir or unique_run_dir("runs", f"{m.cell}-{m.backend}"))
    run.write_config({**config.to_dict(), "data_source": corpus.source, "vocab_size": len(corpus.vocab),
                      "device": str(device)})
    display.message(f"fastlm train | {m.cell} {m.nlayers}x{m.nhid} on {m.backend} | {device} | "
                    f"{corpus.source} ({len(corpus.vocab):,} words) | run folder {run.path}")
    with display:
        result = trainer.fit(run)
    display.message(f"run folder: {run.path}")
    return 130 if result.interrupted else 0
