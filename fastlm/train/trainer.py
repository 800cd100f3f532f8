"""The trainer: the PyTorch word_language_model example's semantics, timed in phases, resumable.

Semantics kept exactly (docs/semantics.md): hidden state carried across batches and detached each batch, mean
cross-entropy, clip_grad_norm_(clip), plain SGD p -= lr * grad, validation after each epoch, best model
saved when validation improves and lr /= 4 when it does not, test loss of the best model at the end.
The loss is accumulated on the device and read once per log interval, not once per step.

Reliability: ``last`` is saved at every epoch end, every ``save_minutes`` and at a stop (signal), with
the exact position, hidden state and RNG states, so ``--resume`` continues as if never stopped.
``--max-steps``/``--max-minutes`` pause the run: where the budget runs out (inside an epoch or between two)
the run reports the validation and test loss of its current weights (a "pause" record, which changes nothing
training depends on: no lr change, no best model), saves ``last`` and ends; ``--resume`` continues at the
next batch, and the split run is the uninterrupted one step for step. A non-finite loss or gradient is found
at the log interval without a per-step host sync: the run stops with the last good state in ``last``, or,
with ``--skip-nonfinite N``, up to N such batches are skipped (the step masks their update on the device)
and recorded in the log lines of metrics.jsonl.

The trainer runs the loop and delegates: checkpoints to ``Checkpoints`` (train/checkpoint.py), the steps between
two log lines to ``LogWindow`` (train/log_window.py), non-finite batches to ``NonFiniteBatches``
(train/nonfinite.py, which raises TrainingDiverged), evaluation to ``Evaluator`` (train/evaluation.py), the
budget and stop requests to ``Budget`` (train/budget.py), the words a user reads to ``TrainDisplay``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm.cells import check_runs_on
from fastlm.config import RunConfig
from fastlm.data.batching import BatchStreamer
from fastlm.device import crowded, machine_load, own_threads
from fastlm.distributed import SINGLE, World
from fastlm.model import RNNLM
from fastlm.precision import use_precision
from fastlm.step import make_train_step, run_step
from fastlm.timing import PhaseTimer
from fastlm.train.budget import Budget
from fastlm.train.checkpoint import Checkpoints
from fastlm.train.evaluation import Evaluator
from fastlm.train.log_window import LogWindow
from fastlm.train.lr_rule import anneals
from fastlm.train.nonfinite import NonFiniteBatches, TrainingDiverged
from fastlm.train.progress import TrainDisplay, perplexity
from fastlm.train.run_folder import RunFolder
from fastlm.train.signals import StopRequest
from fastlm.train.sizing import check_run_fits

__all__ = ["Trainer", "TrainResult", "TrainingDiverged"]  # TrainingDiverged: what fit() raises

DRY_RUN_STEPS = 2  # --dry-run: train and evaluate this many batches of each split, one epoch


@dataclass
class TrainResult:
    best_val_loss: Optional[float]
    test_loss: Optional[float]  # the best model's, at the end of training or after a signal; None at a pause
    steps: int
    exit_status: int  # 0, or 130/143 after SIGINT/SIGTERM
    pause: Optional[dict] = None  # the "pause" record when the budget ran out before the last epoch ended


class Trainer:
    def __init__(self, config: RunConfig, corpus, device: torch.device, display: TrainDisplay,
                 on_step: Optional[Callable[[int, torch.Tensor], None]] = None, world: World = SINGLE):
        self.config, self.corpus, self.device, self.display = config, corpus, device, display
        self.on_step = on_step  # called with (global step, detached loss tensor); for tests and tools
        self.run: Optional[RunFolder] = None  # set by fit(), so bad shapes fail before a folder exists
        self.world = world  # several processes: this one's share of the batch columns (fastlm.distributed)
        t = config.train
        self.train_stream, self.valid_stream, self.test_stream = _streams_that_fit(config, corpus, device, world)
        # This process's columns:
        self.batch_size, self.eval_batch_size = self.train_stream.column_count, self.valid_stream.column_count
        use_precision(t.precision)  # the TF32 switches (process-wide); the step does the rest of the precision
        torch.manual_seed(t.seed)
        check_runs_on(config.model.backend, device.type)
        self.model = RNNLM(len(corpus.vocab), config.model).to(device)
        self.step_fn = make_train_step(self.model, t, world)
        self.evaluator = Evaluator(self.model, device, self.eval_batch_size, t, display, world)
        if world.rank:  # the same initial weights on every rank (above), but dropout masks of its own
            torch.manual_seed(t.seed + world.rank)
        self.timer = PhaseTimer(device)
        self.stop = StopRequest(announce=lambda text: self.display.message(f"[bold yellow]{text}[/]"))
        self.budget = Budget(t, self.stop, world, device)
        self.checkpoints = Checkpoints(self)
        self.nonfinite = NonFiniteBatches(self)
        # Where training stands: the epoch in progress and how many of its batches are done.
        self.epoch, self.batches_done, self.global_step = 1, 0, 0
        self.best_val_loss: Optional[float] = None
        self.state = None  # hidden state carried between batches of an epoch
        self.epoch_train_seconds = 0.0  # spent training the current epoch, across pauses and resumes
        self.last_val_loss: Optional[float] = None  # of the latest epoch end in this process
        self.last_eval_noise: Optional[float] = None  # standard error of the latest evaluation (fastlm.train.lr_rule)

    def restore(self, payload: dict, path) -> None:
        """Continue from a checkpoint (``--resume``)."""
        self.checkpoints.restore(payload, path)

    def append_metrics(self, record: dict) -> None:
        if self.world.main:
            self.run.append_metrics(record)

    def _batches_per_epoch(self) -> int:
        t = self.config.train
        batches = t.steps_per_epoch or len(self.train_stream)
        return min(DRY_RUN_STEPS, batches) if t.dry_run else batches

    def _epoch_start(self) -> int:
        """The train split's batch where the current epoch begins: 0, or with --steps-per-epoch where the
        previous epoch stopped (going round the split)."""
        if not self.config.train.steps_per_epoch:
            return 0
        return (self.epoch - 1) * self.config.train.steps_per_epoch % len(self.train_stream)

    def evaluate(self, stream: BatchStreamer, split: str, interruptible: bool = True,
                 batches: Optional[int] = None) -> Optional[float]:
        """Mean loss per target token over a split (the example's evaluate()), or over its first ``batches``
        (default ``--eval-batches``) batches; its standard error goes to ``last_eval_noise``.

        Returns None when ``interruptible`` and a stop request cut it short (never with several processes:
        every rank must take part in the sum).
        """
        stop = self.stop if interruptible and self.world.size == 1 else None
        evaluated = self.evaluator.evaluate(stream, split, self.evaluation_batches(stream, batches), stop)
        if evaluated is None:
            return None
        loss, self.last_eval_noise = evaluated
        return loss

    def evaluation_batches(self, stream: BatchStreamer, batches: Optional[int] = None) -> int:
        """How many of a split's batches an evaluation takes: ``batches`` or --eval-batches, at most the split
        (and DRY_RUN_STEPS in a dry run)."""
        limit = min(len(stream), batches or self.config.train.eval_batches or len(stream))
        return min(limit, DRY_RUN_STEPS) if self.config.train.dry_run else limit

    def fresh_state_before(self, position: int) -> bool:
        """Whether the step on the train split's batch ``position`` starts from a zero hidden state: at the
        corpus start (as every epoch of the example does), or before every chunk with --state reset."""
        return self.config.train.state == "reset" or position % len(self.train_stream) == 0

    def fit(self, run: RunFolder) -> TrainResult:
        self.run = run
        self.checkpoints.check_room()
        epochs = 1 if self.config.train.dry_run else self.config.train.epochs
        pause = test_loss = None
        with self.stop:
            while self.epoch <= epochs and not self.budget.stop_requested() and not self.budget.spent(self.global_step):
                self.train_epoch()
                if self.budget.stop_requested() or self.batches_done < self._batches_per_epoch():
                    break  # a signal, or the budget ran out inside the epoch: not an epoch end
                if not self._end_epoch():
                    break
            if self.budget.stop_requested():
                self.checkpoints.save_last()
                self.display.stopped(self.epoch, self.batches_done, self.global_step, run.path)
                test_loss = self.test_best()
            elif self.epoch <= epochs:
                pause = self.pause()
            else:
                test_loss = self.test_best()
        return TrainResult(self.best_val_loss, test_loss, self.global_step, self.stop.exit_status, pause)

    def train_epoch(self) -> None:
        """Trains the current epoch from ``batches_done`` until its end, the budget, or a stop request."""
        limit = self._batches_per_epoch()
        start = self._epoch_start() + self.batches_done
        self.model.train()
        self.display.start_epoch(self.epoch, limit)
        window = LogWindow(self.device, skipping=self.config.train.skip_nonfinite > 0)
        self.timer.reset()
        batches = self.train_stream.iterate(start, limit - self.batches_done)
        self.checkpoints.mark_good()  # validated or restored: good, and newer than any older snapshot
        while self.batches_done < limit:
            # With --steps-per-epoch, epochs in the middle of the corpus carry the state on, as the text does.
            if self.fresh_state_before(self._epoch_start() + self.batches_done):
                self.state = self.model.init_state(self.batch_size)
            loss, self.state, tokens = run_step(self.step_fn, batches, self.state, self.timer)
            self.batches_done += 1
            self.global_step += 1
            window.add(loss, tokens, self.global_step, self.step_fn.finite)  # no host sync until the window closes
            if self.on_step is not None:
                self.on_step(self.global_step, loss)
            self.display.advance(self.batches_done)
            self.budget.agree_when_due(self.batches_done, limit)
            end = self.batches_done == limit or self.budget.spent(self.global_step) or self.budget.stop_requested()
            if self.batches_done % self.config.train.log_interval == 0 or end:
                self._log(window, limit)
                window.open()  # after the log line and any save: their time is no step's
            if end:
                return

    def _log(self, window: LogWindow, limit: int) -> None:
        """Closes the window into a log record; a clean window becomes the good state, saved when it is due."""
        samples = self.timer.collect()  # on CUDA this waits for the window's work: the one sync per window
        closed = window.close()
        self.nonfinite.check(closed)  # counts skipped batches, or ends the run
        self.epoch_train_seconds += closed.seconds
        record = closed.record(self.epoch, self.batches_done, limit, self.global_step, self.step_fn.lr, samples)
        record.update(_machine_load_fields(self.display), **self.nonfinite.log_fields(closed))
        self.timer.reset()
        self.append_metrics(record)
        self.display.log(record, limit)
        # A window with skipped batches does not refresh the snapshot (nor save it: that would write an older
        # state over a newer last.pt); the next clean window does both.
        if not closed.bad:
            self.checkpoints.mark_good()
            if self.checkpoints.save_due():
                self.checkpoints.save_last(self.checkpoints.good)

    def _end_epoch(self) -> bool:
        """Validation and the example's bookkeeping; False when a stop request cut validation short."""
        started = time.perf_counter()
        val_loss = self.evaluate(self.valid_stream, "valid")
        if val_loss is None:
            return False
        self.last_val_loss = val_loss
        train_seconds, eval_seconds = self.epoch_train_seconds, time.perf_counter() - started
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, "val_loss": val_loss,
                  "val_ppl": perplexity(val_loss), "seconds": train_seconds + eval_seconds,
                  "train_seconds": train_seconds, "eval_seconds": eval_seconds, "best": improved,
                  "val_noise": self.last_eval_noise}
        anneal = anneals(self.config.train.lr_rule, val_loss, self.best_val_loss, self.last_eval_noise,
                         last_epoch_next=self.epoch + 1 == self.config.train.epochs)
        self.epoch, self.batches_done, self.epoch_train_seconds = self.epoch + 1, 0, 0.0
        if anneal:  # before the checkpoint, so that a resumed run goes on at the lr this one would have
            self.step_fn.lr /= 4.0
        if improved:
            self.best_val_loss = val_loss
            self.checkpoints.save_best()
        record["lr_next"] = self.step_fn.lr
        self.append_metrics(record)
        self.display.epoch_summary(record)
        self.checkpoints.save_last()
        return True

    def pause(self) -> Optional[dict]:
        """The budget ran out before training ended: save ``last`` where the run stands, then report the
        validation and test loss of the current weights as a "pause" record. Evaluation draws no random
        numbers and touches neither the lr nor the best model, so a resumed run goes on as if never paused.
        Returns the record (None when a signal cut the report short; ``last`` is saved by then).

        A budget that ran out with an epoch has nothing more to save or validate: the epoch's end saved ``last``
        and validated these very weights."""
        at_epoch_end = self.batches_done == 0 and self.last_val_loss is not None
        if not at_epoch_end:
            self.checkpoints.save_last()
        val_loss = self.last_val_loss if at_epoch_end else self.evaluate(self.valid_stream, "valid")
        test_loss = self.evaluate(self.test_stream, "test") if val_loss is not None else None
        if test_loss is None:
            return None
        record = {"kind": "pause", "epoch": self.epoch, "batch": self.batches_done, "step": self.global_step,
                  "lr": self.step_fn.lr, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
                  "test_loss": test_loss, "test_ppl": perplexity(test_loss)}
        self.append_metrics(record)
        self.display.paused(record, self.run.path)
        return record

    def test_best(self) -> Optional[float]:
        """Loads the best checkpoint, reports its test loss and ppl, and records them."""
        if self.best_val_loss is None:  # no validation yet in this run: no best model of its own to test
            self.display.message("no best model yet (no epoch finished its validation): nothing to test")
            return None
        self.checkpoints.load_best_model()
        test_loss = self.evaluate(self.test_stream, "test", interruptible=False)  # after a stop too; a 2nd signal exits
        self.append_metrics({"kind": "test", "test_loss": test_loss, "test_ppl": perplexity(test_loss),
                             "step": self.global_step})
        self.display.tested(test_loss)
        if self.config.train.save:
            self.checkpoints.copy_best(self.config.train.save)
        return test_loss


def _machine_load_fields(display: TrainDisplay) -> dict:
    """A log record's load fields. Where other work competes for the cores the record marks its timings unreliable
    (and the display says so once)."""
    load, cores = machine_load()
    # The run's own threads (and its sweep's other points') are in the load too: only the rest is other work.
    own = own_threads(torch.get_num_threads())
    fields = {"load": round(load, 2), "cores": cores, "own_threads": own}
    if crowded(load - own, cores, own):
        fields["timing_unreliable"] = True
        display.busy_machine(load, cores, own)
    return fields


def _streams_that_fit(config: RunConfig, corpus, device: torch.device, world: World) -> tuple:
    """The train, valid and test splits' batches of this process's share of the columns, in memory
    (BatchStreamer) or streamed from the token cache (TokenFileStream): the same batches. Refused, before the model
    is built, when what this process holds cannot fit in the device's memory (train/sizing.py)."""
    d = config.data
    columns, eval_columns = world.columns(d.batch_size), world.columns(d.eval_batch_size, "--eval-batch-size")
    streams = (corpus.batches("train", d.batch_size, d.bptt, device, columns),
               corpus.batches("valid", d.eval_batch_size, d.bptt, device, eval_columns),
               corpus.batches("test", d.eval_batch_size, d.bptt, device, eval_columns))
    share = RunConfig.from_dict(config.to_dict(), origin="this process's share")
    share.data.batch_size, share.data.eval_batch_size = streams[0].column_count, streams[1].column_count
    check_run_fits(share, len(corpus.vocab), device)
    return streams
