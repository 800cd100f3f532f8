"""Non-finite batches: what a log window whose steps had a NaN or infinite loss or gradients does to the run.

The log window counts such steps on the device and reads the count when it closes (train/log_window.py), so
they are found without a per-step host sync. Without --skip-nonfinite the first one stops the run: ``last``
gets the last good state (the snapshot of the latest clean window, train/checkpoint.py), metrics.jsonl a
"diverged" record, and TrainingDiverged says how to resume. With --skip-nonfinite N the step has masked their
updates on the device: they are counted across the run (the count is in every checkpoint), said, and recorded
in the log records, and the run stops as above once more than N were skipped in all.
"""

from __future__ import annotations

from fastlm.errors import FastlmError
from fastlm.train.log_window import ClosedWindow


class TrainingDiverged(FastlmError):
    """The loss became NaN or infinite; ``last`` holds the last good state."""

    exit_status = 3


class NonFiniteBatches:
    def __init__(self, trainer):
        # The trainer, read at each call: its checkpoints, run folder, display and where training stands.
        self.trainer = trainer
        self.allowed = trainer.config.train.skip_nonfinite
        self.skipped = 0  # batches skipped so far in the run, across resumes

    def check(self, window: ClosedWindow) -> None:
        """The closing window's non-finite steps, if any: counted as skipped, or the run stops (TrainingDiverged)."""
        if not window.bad:
            return
        allowed, trainer = self.allowed, self.trainer
        self.skipped += window.bad if allowed else 0
        if allowed and self.skipped <= allowed:
            trainer.display.skipped(window.bad, window.first_bad, self.skipped, allowed)
            return
        good = trainer.checkpoints.good
        trainer.checkpoints.save_last(good)
        what = (f"the loss or gradients became non-finite at step {window.first_bad}" if not allowed else
                f"{self.skipped} batches had a non-finite loss or gradients (the latest window's first at step "
                f"{window.first_bad}), more than --skip-nonfinite {allowed}")
        message = (f"{what}; training stopped and {trainer.run.last} holds the last good state (step "
                   f"{good['step']}): resume from it with a lower lr or clip, e.g. fastlm train --resume "
                   f"{trainer.run.path} --lr {good['lr'] / 4:g}")
        trainer.append_metrics({"kind": "diverged", "step": window.first_bad, "epoch": trainer.epoch,
                                "message": message})
        raise TrainingDiverged(message)

    def log_fields(self, window: ClosedWindow) -> dict:
        """What the window's log record says of skipped batches (with --skip-nonfinite only)."""
        if not self.allowed:
            return {}
        return {"skipped": window.bad, "first_skipped_step": window.first_bad if window.bad else None,
                "skipped_total": self.skipped}
