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
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm.cells import check_runs_on
from fastlm.config import RunConfig
from fastlm.data.batching import BatchStreamer
from fastlm.device import crowded, machine_load, own_threads
from fastlm.distributed import (
    SINGLE,
    World,
    broadcast_parameters,
    gather_columns,
    gather_objects,
    on_rank_zero,
    sum_,
)
from fastlm.errors import FastlmError, short
from fastlm.model import RNNLM, map_state
from fastlm.precision import use_precision
from fastlm.step import make_train_step, run_step
from fastlm.step.optimizer import detached_state
from fastlm.step.optimizer import load_state as load_optimizer_state
from fastlm.timing import ALLREDUCE, PHASES, STEP, PhaseTimer
from fastlm.train import checkpoint
from fastlm.train.checkpoint import load_checkpoint, save_checkpoint
from fastlm.train.lr_rule import anneals, validation_noise
from fastlm.train.progress import TrainDisplay, perplexity
from fastlm.train.run_folder import RunFolder
from fastlm.train.signals import StopRequest
from fastlm.train.sizing import check_run_fits

DRY_RUN_STEPS = 2  # --dry-run: train and evaluate this many batches of each split, one epoch


class TrainingDiverged(FastlmError):
    """The loss became NaN or infinite; ``last`` holds the last good state."""

    exit_status = 3


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
        d, t = config.data, config.train
        columns, eval_columns = world.columns(d.batch_size), world.columns(d.eval_batch_size, "--eval-batch-size")
        # In memory (BatchStreamer) or streamed from the token cache (TokenFileStream): the same batches.
        self.train_stream = corpus.batches("train", d.batch_size, d.bptt, device, columns)
        self.valid_stream = corpus.batches("valid", d.eval_batch_size, d.bptt, device, eval_columns)
        self.test_stream = corpus.batches("test", d.eval_batch_size, d.bptt, device, eval_columns)
        # This process's columns:
        self.batch_size, self.eval_batch_size = self.train_stream.column_count, self.valid_stream.column_count
        # What this process holds: its share of the batch columns.
        share = RunConfig.from_dict(config.to_dict(), origin="this process's share")
        share.data.batch_size, share.data.eval_batch_size = self.batch_size, self.eval_batch_size
        check_run_fits(share, len(corpus.vocab), device)
        use_precision(t.precision)  # the TF32 switches (process-wide); the step does the rest of the precision
        torch.manual_seed(t.seed)
        check_runs_on(config.model.backend, device.type)
        self.model = RNNLM(len(corpus.vocab), config.model).to(device)
        self.step_fn = make_train_step(self.model, t, world)
        if world.rank:  # the same initial weights on every rank (above), but dropout masks of its own
            torch.manual_seed(t.seed + world.rank)
        self.timer = PhaseTimer(device)
        self.stop = StopRequest(announce=lambda text: self.display.message(f"[bold yellow]{text}[/]"))
        # Where training stands: the epoch in progress and how many of its batches are done.
        self.epoch, self.batches_done, self.global_step = 1, 0, 0
        self.best_val_loss: Optional[float] = None
        self.state = None  # hidden state carried between batches of an epoch
        self._deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None
        self._agreed = {"stop": False, "deadline": False}  # with several processes: what all ranks agreed on
        # How often the ranks agree on stopping: every step on CPU (an 8-byte gloo all-reduce, ~0.1 ms against
        # steps of 10-1000 ms), so that a signal is obeyed before torchrun's 30 s shutdown grace runs out; on
        # CUDA at log intervals (agreeing reads a device value: a host sync, which the fast path avoids).
        self._agree_every_step = device.type != "cuda"
        self._last_save = time.monotonic()
        self._good: Optional[dict] = None  # snapshot at the latest log window without a non-finite step
        self.skipped_batches = 0  # non-finite batches skipped so far (--skip-nonfinite)
        self.epoch_train_seconds = 0.0  # spent training the current epoch, across pauses and resumes
        self._warned_load = False
        self.last_val_loss: Optional[float] = None  # of the latest epoch end in this process
        self.last_eval_noise: Optional[float] = None  # standard error of the latest evaluation (fastlm.train.lr_rule)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, copy: bool = False) -> dict:
        """The checkpoint of the current state; ``copy`` detaches it from tensors training will update.
        With several processes every rank must call it at the same point (it gathers their hidden states and
        random states), and rank 0's is the one saved."""
        model, optimizer = self.model.state_dict(), self.step_fn.optimizer.state_dict()
        if copy:  # AdamW's moments too: the optimizer goes on updating them in place
            model = {name: tensor.detach().clone() for name, tensor in model.items()}
            optimizer = detached_state(optimizer)
        hidden = self.state
        if self.world.size > 1 and hidden is not None:  # the whole batch's state: every rank's columns
            hidden = map_state(lambda s: gather_columns(s, self.world), hidden)
        rng = checkpoint.rng_state()
        ranks = {"rng_ranks": gather_objects(rng, self.world)} if self.world.size > 1 else {}
        return {"model": model, "optimizer": optimizer,
                "config": self.config.to_dict(), "vocab": list(self.corpus.vocab.idx2word),
                "vocab_digest": self.corpus.vocab.digest(), "epoch": self.epoch,
                "batches_done": self.batches_done, "step": self.global_step, "lr": self.step_fn.lr,
                "best_val_loss": self.best_val_loss, "skipped_batches": self.skipped_batches,
                "epoch_train_seconds": self.epoch_train_seconds,
                "hidden": checkpoint.hidden_to_save(hidden),
                "rng": rng, **ranks}

    def _save_last(self, payload: Optional[dict] = None) -> None:
        """Saves ``last`` (rank 0 writes it; with several processes every rank calls this at the same point)."""
        payload = payload or self._payload()
        on_rank_zero(lambda: save_checkpoint(self.run.last, payload), self.world)
        self._last_save = time.monotonic()

    def _save_due(self) -> bool:
        """--save-minutes have passed since the last save: rank 0's clock decides for every rank."""
        return on_rank_zero(lambda: time.monotonic() - self._last_save >= 60 * self.config.train.save_minutes,
                            self.world)

    def _append_metrics(self, record: dict) -> None:
        if self.world.main:
            self.run.append_metrics(record)

    def restore(self, payload: dict, path) -> None:
        """Continue from a checkpoint written by ``_payload`` (``--resume``)."""
        checkpoint.check_vocabulary(payload, self.corpus, path)
        try:
            self.model.load_state_dict(payload["model"])
            load_optimizer_state(self.step_fn.optimizer, payload["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise FastlmError(f"checkpoint {path} does not fit this model: {short(e)}") from None
        self.step_fn.lr = payload["lr"]
        self.epoch, self.batches_done = payload["epoch"], payload["batches_done"]
        self.global_step, self.best_val_loss = payload["step"], payload["best_val_loss"]
        self.skipped_batches = payload.get("skipped_batches", 0)  # absent before --skip-nonfinite existed
        self.epoch_train_seconds = payload.get("epoch_train_seconds", 0.0)
        hidden = checkpoint.hidden_from_saved(payload["hidden"], self.device, self.config.model.cell)
        share = self.world.columns(self.config.data.batch_size)
        self.state = map_state(lambda s: s[:, share].contiguous(), hidden) if hidden is not None else None
        ranks = payload.get("rng_ranks") or [payload["rng"]]
        if len(ranks) == self.world.size:
            checkpoint.set_rng_state(ranks[self.world.rank])
        else:  # the batches and weights go on exactly; dropout draws do not
            checkpoint.set_rng_state(ranks[0])
            if self.world.rank:
                torch.manual_seed(self.config.train.seed + self.world.rank + payload["step"])
            self.display.message(f"[bold yellow]note: {path} was written by {len(ranks)} process(es) and this "
                                 f"run has {self.world.size}: training goes on from the same state, but with other "
                                 f"dropout masks than an uninterrupted run would draw[/]")

    def _check_room(self) -> None:
        on_rank_zero(self._check_room_here, self.world)  # rank 0 writes; every rank hears if it cannot

    def _check_room_here(self) -> None:
        # best + last + the temporary file of a write, less the checkpoints already there (a resume replaces them)
        moments = 2 if self.config.train.optimizer == "adamw" else 0  # AdamW's exp_avg and exp_avg_sq
        there = sum(path.is_file() for path in (self.run.best, self.run.last))
        needed = (3 - there) * checkpoint.checkpoint_bytes(self.model, moments)
        free = shutil.disk_usage(self.run.path).free
        if free < needed:
            raise FastlmError(f"run folder {self.run.path} has {free / 2**20:.0f} MiB free but checkpoints need "
                              f"about {needed / 2**20:.0f} MiB; free some space or choose another --run-dir")

    # ------------------------------------------------------------------ budget
    def _budget_spent(self) -> bool:
        t = self.config.train
        if t.max_steps is not None and self.global_step >= t.max_steps:
            return True
        if self.world.size > 1:
            return self._agreed["deadline"]
        return self._out_of_time()

    def _out_of_time(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _stop_requested(self) -> bool:
        return self._agreed["stop"] if self.world.size > 1 else self.stop.requested

    def _agree(self) -> None:
        """Several processes: every rank learns whether any was signalled or ran out of time, at the same step
        (the clock and signals differ between processes; the collectives after this point must not)."""
        stop, late = self.stop.requested, self._out_of_time()
        flags = torch.tensor([int(stop), int(late)], device=self.device)
        sum_(flags, self.world)
        self._agreed = {"stop": bool(flags[0].item()), "deadline": bool(flags[1].item())}
        if self._agreed["stop"] and not stop:
            self.stop.request()

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

    # ------------------------------------------------------------------ loops
    def evaluate(self, stream: BatchStreamer, split: str, interruptible: bool = True,
                 batches: Optional[int] = None) -> Optional[float]:
        """Mean loss per target token over a split (the example's evaluate()), or over its first ``batches``
        (default ``--eval-batches``) batches.

        Returns None when ``interruptible`` and a stop request cut it short. With several processes each
        evaluates its share of the split's columns and the sums are added up (never interrupted: every rank must
        take part in the sum).
        """
        interruptible = interruptible and self.world.size == 1
        self.model.eval()
        limit = self.evaluation_batches(stream, batches)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        squares = torch.zeros((), device=self.device, dtype=torch.float64)  # of batch losses: the noise
        count = batches_seen = 0
        state = self.model.init_state(self.eval_batch_size)
        with torch.no_grad(), self.display.evaluating(split, limit) as advance:
            for index, inputs, targets in stream.iterate(0, limit):
                if interruptible and self.stop.requested:
                    self.model.train()
                    return None
                if self.config.train.state == "reset":
                    state = self.model.init_state(self.eval_batch_size)
                hidden, state = self.model(inputs, state)
                batch_loss = self.model.loss(hidden, targets).double()
                total += batch_loss * targets.numel()
                squares += batch_loss * batch_loss * targets.numel()
                count += targets.numel()
                batches_seen += 1
                advance(index + 1)
        self.model.train()
        if self.world.size > 1:
            sums = torch.stack([total, squares, torch.tensor(float(count), device=self.device, dtype=torch.float64)])
            total, squares, count = sum_(sums, self.world).tolist()
            batches_seen *= self.world.size  # each rank's share of a batch counts as a batch of its own
        else:
            total, squares = total.item(), squares.item()
        self.last_eval_noise = validation_noise(total, squares, count, batches_seen)
        return total / count

    def evaluation_batches(self, stream: BatchStreamer, batches: Optional[int] = None) -> int:
        """How many of a split's batches an evaluation takes: ``batches`` or --eval-batches, at most the split
        (and DRY_RUN_STEPS in a dry run)."""
        limit = min(len(stream), batches or self.config.train.eval_batches or len(stream))
        return min(limit, DRY_RUN_STEPS) if self.config.train.dry_run else limit

    def fresh_state_before(self, position: int) -> bool:
        """Whether the step on the train split's batch ``position`` starts from a zero hidden state: at the
        corpus start (as every epoch of the example does), or before every chunk with --state reset."""
        return self.config.train.state == "reset" or position % len(self.train_stream) == 0

    def train_epoch(self) -> None:
        """Trains the current epoch from ``batches_done`` until its end, the budget, or a stop request."""
        t = self.config.train
        limit = self._batches_per_epoch()
        start = self._epoch_start() + self.batches_done
        self.model.train()
        self.display.start_epoch(self.epoch, limit)
        skipping = t.skip_nonfinite > 0
        window_loss = torch.zeros((), device=self.device)
        window_bad = torch.zeros((), device=self.device, dtype=torch.long)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        self.timer.reset()
        batches = self.train_stream.iterate(start, limit - self.batches_done)
        self._good = self._payload(copy=True)  # validated or restored: good, and newer than any older snapshot
        while self.batches_done < limit:
            # With --steps-per-epoch, epochs in the middle of the corpus carry the state on, as the text does.
            if self.fresh_state_before(self._epoch_start() + self.batches_done):
                self.state = self.model.init_state(self.batch_size)
            loss, self.state, tokens = run_step(self.step_fn, batches, self.state, self.timer)
            self.batches_done += 1
            self.global_step += 1
            # Count non-finite steps and remember the first on the device: no host sync until the log
            # interval. A skipped step's loss stays out of the window's mean.
            bad = ~(self.step_fn.finite if self.step_fn.finite is not None else torch.isfinite(loss))
            window_bad += bad
            first_bad = torch.where((first_bad < 0) & bad, self.global_step, first_bad)
            window_loss += torch.where(bad, 0.0, loss) if skipping else loss
            window_steps += 1
            window_tokens += tokens
            if self.on_step is not None:
                self.on_step(self.global_step, loss)
            self.display.advance(self.batches_done)
            if self.world.size > 1 and (self._agree_every_step or self.batches_done % t.log_interval == 0
                                        or self.batches_done == limit):
                self._agree()
            end = self.batches_done == limit or self._budget_spent() or self._stop_requested()
            if self.batches_done % t.log_interval == 0 or end:
                self._close_window(limit, window_loss, window_bad, first_bad, window_steps, window_tokens,
                                   window_start)
                window_loss.zero_()
                window_bad.zero_()
                first_bad.fill_(-1)
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
            if end:
                return

    def _close_window(self, limit, window_loss, window_bad, first_bad, steps, tokens, started) -> None:
        samples = self.timer.collect()  # on CUDA this waits for the window's work: the one sync per window
        bad, bad_step = int(window_bad.item()), int(first_bad.item())
        if bad:
            self._check_nonfinite(bad, bad_step)
        loss = window_loss.item() / (steps - bad) if steps > bad else None
        seconds = time.perf_counter() - started
        self.epoch_train_seconds += seconds
        record = {"kind": "log", "epoch": self.epoch, "batch": self.batches_done, "epoch_batches": limit,
                  "step": self.global_step, "loss": loss, "ppl": perplexity(loss) if loss is not None else None,
                  "lr": self.step_fn.lr, "ms_per_batch": 1e3 * seconds / steps, "tokens_per_s": tokens / seconds,
                  "phases_ms": {name: _mean(samples.get(name)) for name in (*PHASES, STEP)}}
        if ALLREDUCE in samples:  # several processes: the all-reduce that backward waited for (in backward's time)
            record["phases_ms"][ALLREDUCE] = _mean(samples[ALLREDUCE])
        load, cores = machine_load()
        # The run's own threads (and its sweep's other points') are in the load too: only the rest is other work.
        own = own_threads(torch.get_num_threads())
        record.update(load=round(load, 2), cores=cores, own_threads=own)
        if crowded(load - own, cores, own):
            record["timing_unreliable"] = True
            if not self._warned_load:
                self._warned_load = True
                self.display.message(f"[bold yellow]warning: the machine's load ({load:.1f}) exceeds its {cores} "
                                     f"cores, beyond what this run's own {own} threads put on them: other work "
                                     f"competes for the cores, so these timings are unreliable (marked in "
                                     f"metrics.jsonl; fewer --threads may help)[/]")
        if self.config.train.skip_nonfinite:
            record.update(skipped=bad, first_skipped_step=bad_step if bad else None,
                          skipped_total=self.skipped_batches)
        self.timer.reset()
        self._append_metrics(record)
        self.display.log(record, limit)
        # A window with skipped batches does not refresh the snapshot (nor save it: that would write an older
        # state over a newer last.pt); the next clean window does both.
        if not bad:
            self._good = self._payload(copy=True)
            if self._save_due():
                self._save_last(self._good)

    def _check_nonfinite(self, bad: int, first_step: int) -> None:
        """``bad`` steps of the closing window were non-finite: count them as skipped, or stop the run."""
        allowed = self.config.train.skip_nonfinite
        self.skipped_batches += bad if allowed else 0
        if allowed and self.skipped_batches <= allowed:
            self.display.message(f"[bold yellow]skipped {bad} batch(es) with a non-finite loss or gradients, the "
                                 f"first at step {first_step} ({self.skipped_batches} of --skip-nonfinite "
                                 f"{allowed} used)[/]")
            return
        self._save_last(self._good)
        what = (f"the loss or gradients became non-finite at step {first_step}" if not allowed else
                f"{self.skipped_batches} batches had a non-finite loss or gradients (the latest window's first "
                f"at step {first_step}), more than --skip-nonfinite {allowed}")
        message = (f"{what}; training stopped and {self.run.last} holds the last good state (step "
                   f"{self._good['step']}): resume from it with a lower lr or clip, e.g. fastlm train --resume "
                   f"{self.run.path} --lr {self._good['lr'] / 4:g}")
        self._append_metrics({"kind": "diverged", "step": first_step, "epoch": self.epoch, "message": message})
        raise TrainingDiverged(message)

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
            payload = self._payload()
            on_rank_zero(lambda: save_checkpoint(self.run.best, payload), self.world)
        record["lr_next"] = self.step_fn.lr
        self._append_metrics(record)
        self.display.epoch_summary(record)
        self._save_last()
        return True

    def fit(self, run: RunFolder) -> TrainResult:
        self.run = run
        self._check_room()
        epochs = 1 if self.config.train.dry_run else self.config.train.epochs
        pause = test_loss = None
        with self.stop:
            while self.epoch <= epochs and not self._stop_requested() and not self._budget_spent():
                self.train_epoch()
                if self._stop_requested() or self.batches_done < self._batches_per_epoch():
                    break  # a signal, or the budget ran out inside the epoch: not an epoch end
                if not self._end_epoch():
                    break
            if self._stop_requested():
                self._save_last()
                self.display.message(f"[bold yellow]stopped at epoch {self.epoch}, {self.batches_done} batches in "
                                     f"(step {self.global_step}); 'last' saved: continue with --resume {run.path}[/]")
                test_loss = self.test_best()
            elif self.epoch <= epochs:
                pause = self.pause()
            else:
                test_loss = self.test_best()
        return TrainResult(self.best_val_loss, test_loss, self.global_step, self.stop.exit_status, pause)

    def pause(self) -> Optional[dict]:
        """The budget ran out before training ended: save ``last`` where the run stands, then report the
        validation and test loss of the current weights as a "pause" record. Evaluation draws no random
        numbers and touches neither the lr nor the best model, so a resumed run goes on as if never paused.
        Returns the record (None when a signal cut the report short; ``last`` is saved by then).

        A budget that ran out with an epoch has nothing more to save or validate: the epoch's end saved ``last``
        and validated these very weights."""
        at_epoch_end = self.batches_done == 0 and self.last_val_loss is not None
        if not at_epoch_end:
            self._save_last()
        val_loss = self.last_val_loss if at_epoch_end else self.evaluate(self.valid_stream, "valid")
        test_loss = self.evaluate(self.test_stream, "test") if val_loss is not None else None
        if test_loss is None:
            return None
        record = {"kind": "pause", "epoch": self.epoch, "batch": self.batches_done, "step": self.global_step,
                  "lr": self.step_fn.lr, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
                  "test_loss": test_loss, "test_ppl": perplexity(test_loss)}
        self._append_metrics(record)
        self.display.message(f"[bold]paused at epoch {self.epoch}, batch {self.batches_done} (step "
                             f"{self.global_step}): the --max-steps/--max-minutes budget is spent | current "
                             f"weights: valid ppl {record['val_ppl']:8.2f} | test ppl {record['test_ppl']:8.2f}[/]")
        self.display.message(f"'last' saved: continue with fastlm train --resume {self.run.path} (and a new "
                             f"--max-steps or --max-minutes)")
        return record

    def test_best(self) -> Optional[float]:
        """Loads the best checkpoint, reports its test loss and ppl, and records them."""
        if self.best_val_loss is None:  # no validation yet in this run: no best model of its own to test
            self.display.message("no best model yet (no epoch finished its validation): nothing to test")
            return None
        if self.world.main:
            self.model.load_state_dict(load_checkpoint(self.run.best)["model"])
        broadcast_parameters(self.model, self.world)  # rank 0 read the best model: all ranks test it
        test_loss = self.evaluate(self.test_stream, "test", interruptible=False)  # after a stop too; a 2nd signal exits
        self._append_metrics({"kind": "test", "test_loss": test_loss, "test_ppl": perplexity(test_loss),
                              "step": self.global_step})
        self.display.message(f"[bold]End of training | test loss {test_loss:5.2f} | "
                             f"test ppl {perplexity(test_loss):8.2f}[/]")
        if self.config.train.save:
            on_rank_zero(lambda: save_checkpoint(self.config.train.save, load_checkpoint(self.run.best)), self.world)
        return test_loss


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None
