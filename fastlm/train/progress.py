"""What a user watches during training: a rich progress bar with live figures, and plain log lines.

On a terminal the bar shows ms/batch, tokens/s, loss, ppl and lr as they update; elsewhere (CI, a file)
the bar is off and the same figures come as one printed line per log interval.
"""

from __future__ import annotations

import contextlib
import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class TrainDisplay:
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"), TimeRemainingColumn(),
            console=self.console, disable=not self.console.is_terminal, transient=True)
        self._task = None
        self._warned_busy = False

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, total_batches: int) -> None:
        if self._task is not None:
            self.progress.remove_task(self._task)
        self._task = self.progress.add_task(f"epoch {epoch}", total=total_batches, figures="")

    def advance(self, completed: int) -> None:
        self.progress.update(self._task, completed=completed)

    def log(self, record: dict, total_batches: int) -> None:
        # A window whose every batch was skipped (--skip-nonfinite) has no loss.
        loss = "  n/a | ppl      n/a" if record["loss"] is None else f"{record['loss']:5.2f} | ppl {record['ppl']:8.2f}"
        figures = (f"{record['ms_per_batch']:7.1f} ms/batch | {record['tokens_per_s']:9,.0f} tok/s | "
                   f"loss {loss} | lr {record['lr']:.4g}")
        self.progress.update(self._task, figures=figures)
        line = f"| epoch {record['epoch']:3d} | {record['batch']:5d}/{total_batches:5d} batches | {figures}"
        self.console.print(line, soft_wrap=True)

    @contextlib.contextmanager
    def evaluating(self, split: str, batches: int):
        """Around an evaluation: a progress bar on a terminal, one line elsewhere, so that a long validation is
        never silent. Yields ``advance(batches_done)``."""
        if not self.progress.disable:
            task = self.progress.add_task(f"{split}", total=batches, figures="evaluating")
            try:
                yield lambda done: self.progress.update(task, completed=done)
            finally:
                self.progress.remove_task(task)
            return
        self.console.print(f"evaluating on {batches} {split} batches", soft_wrap=True)
        yield lambda done: None

    def epoch_summary(self, record: dict) -> None:
        self.console.rule(f"end of epoch {record['epoch']} | {record['seconds']:.1f} s | "
                          f"valid loss {record['val_loss']:.2f} | valid ppl {record['val_ppl']:.2f}"
                          + (" | best so far" if record.get("best") else f" | lr -> {record['lr_next']:.4g}"))

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def busy_machine(self, load: float, cores: int, own: int) -> None:
        """Says once that other work than the run's ``own`` threads is too much to time (each log record marks it)."""
        if not self._warned_busy:
            self._warned_busy = True
            self.message(f"[bold yellow]warning: the machine's load ({load:.1f}) exceeds its {cores} cores, beyond "
                         f"what this run's own {own} threads put on them: other work competes for the cores, so "
                         f"these timings are unreliable (marked in metrics.jsonl; fewer --threads may help)[/]")

    def skipped(self, bad: int, first_step: int, used: int, allowed: int) -> None:
        self.message(f"[bold yellow]skipped {bad} batch(es) with a non-finite loss or gradients, the first at step "
                     f"{first_step} ({used} of --skip-nonfinite {allowed} used)[/]")

    def stopped(self, epoch: int, batches: int, step: int, run_path) -> None:
        self.message(f"[bold yellow]stopped at epoch {epoch}, {batches} batches in (step {step}); 'last' saved: "
                     f"continue with --resume {run_path}[/]")

    def paused(self, record: dict, run_path) -> None:
        """The budget ran out: the "pause" record, and how to go on."""
        self.message(f"[bold]paused at epoch {record['epoch']}, batch {record['batch']} (step {record['step']}): "
                     f"the --max-steps/--max-minutes budget is spent | current weights: valid ppl "
                     f"{record['val_ppl']:8.2f} | test ppl {record['test_ppl']:8.2f}[/]")
        self.message(f"'last' saved: continue with fastlm train --resume {run_path} (and a new --max-steps or "
                     f"--max-minutes)")

    def tested(self, test_loss: float) -> None:
        self.message(f"[bold]End of training | test loss {test_loss:5.2f} | test ppl {perplexity(test_loss):8.2f}[/]")
