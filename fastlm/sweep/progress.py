"""What a user watches while a sweep runs: points done of all, the running points with their progress, and the
time left at the rate so far.

Each point's start, each of its epochs and its end are a printed line (with the seconds since the sweep
started); between epochs, a running point's progress (batches of its epoch, ms a batch, the epoch's time left)
is a printed line at most every PROGRESS_EVERY seconds, so a long first epoch is not silent. On a terminal a
progress bar below them counts the points, estimates the time left and shows each running point's progress as
it goes. The running points' figures are read from their metrics.jsonl (its log records, one a --log-interval).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fastlm.report.collect import read_metrics

PROGRESS_EVERY = 60.0  # seconds between two printed progress lines of a point (the bar shows every change)


def latest_epoch(records: list[dict]):
    """(epoch, its validation ppl) of the newest epoch or pause record, or None."""
    for record in reversed(records):
        if record.get("kind") in ("epoch", "pause"):
            return record["epoch"], record["val_ppl"]
    return None


def latest_progress(records: list[dict]):
    """The newest log record of the epoch under way, or None (none yet, or its epoch has ended)."""
    for record in reversed(records):
        if record.get("kind") == "log" and None not in (record.get("batch"), record.get("ms_per_batch")):
            return record
        if record.get("kind") in ("epoch", "pause"):
            return None
    return None


def progress_text(record: dict) -> str:
    """A log record as "epoch 1: 400/2,983 batches, 702 ms/batch, ~30 min left in the epoch"."""
    done, total, ms = record["batch"], record.get("epoch_batches"), record["ms_per_batch"]
    if not total:  # a record written before fastlm recorded the epoch's length
        return f"epoch {record['epoch']}: {done:,} batches, {ms:,.0f} ms/batch"
    left = max(0, total - done) * ms / 1e3
    return (f"epoch {record['epoch']}: {done:,}/{total:,} batches, {ms:,.0f} ms/batch, ~{duration(left)} left in the "
            f"epoch")


def duration(seconds: float) -> str:
    """``seconds`` in the unit a person reads them in."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SweepProgress:
    def __init__(self, out: Path, entries: list[dict], console: Console | None = None):
        self.out, self.entries = out, entries
        self.console = console or Console()
        self.progress = Progress(TextColumn("points"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[running]}"), TimeRemainingColumn(),
                                 console=self.console, disable=not self.console.is_terminal)
        self._task = None
        self._shown: dict[str, tuple] = {}  # name -> (status, latest epoch) last printed
        self._progress_shown: dict[str, tuple] = {}  # name -> (step, monotonic time) of its last line
        self._read: dict[Path, tuple] = {}  # metrics.jsonl -> ((size, mtime) when read, latest epoch, progress)
        self._started = time.monotonic()

    def start(self, todo: int, jobs: int, devices: list[str]) -> None:
        finished = len(self.entries) - todo
        self.console.print(f"fastlm sweep | {len(self.entries)} points: {finished} finished, {todo} to run | "
                           f"{jobs} at a time on {', '.join(devices)} | {self.out}", soft_wrap=True)
        self.progress.start()
        self._task = self.progress.add_task("sweep", total=todo, running="")

    def update(self) -> None:
        running = []
        for entry in self.entries:
            epoch = progress = None
            if entry["status"] == "running":
                epoch, progress = self._latest(self.out / entry["run_dir"])
                figures = (progress_text(progress) if progress else
                           f"epoch {epoch[0]} ppl {epoch[1]:.1f}" if epoch else "")
                running.append(f"{entry['name']} {figures}".strip())
            self._print_change(entry, epoch)
            self._print_progress(entry, progress)
        self.progress.update(self._task, completed=self._completed(), running=" | ".join(running))

    def _latest(self, run_dir: Path) -> tuple:
        """(latest_epoch, latest_progress) of a running point, re-read only when its metrics.jsonl changed (this
        runs 5 times a second; a line the child is still writing is skipped by read_metrics)."""
        path = run_dir / "metrics.jsonl"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None, None
        seen = (stat.st_size, stat.st_mtime_ns)
        if self._read.get(path, (None,))[0] != seen:
            records = read_metrics(path)
            self._read[path] = (seen, latest_epoch(records), latest_progress(records))
        return self._read[path][1:]

    def _completed(self) -> int:
        """Points this invocation ran to an end (the bar counts those; earlier ones are not in its total)."""
        return sum(1 for name, (status, _) in self._shown.items() if status in ("done", "budget", "failed"))

    def _print_change(self, entry: dict, epoch) -> None:
        """A line when a point starts, finishes an epoch, or ends."""
        key = (entry["status"], epoch)
        before = self._shown.get(entry["name"])
        if before == key or (before is None and entry["status"] != "running"):
            return
        self._shown[entry["name"]] = key
        if entry["status"] == "running" and (before is None or before[0] != "running"):
            line = f"started {entry['name']} on {entry.get('device')}"
            self._progress_shown[entry["name"]] = (None, time.monotonic())
        elif entry["status"] == "running":
            line = f"  {entry['name']}: epoch {epoch[0]} valid ppl {epoch[1]:.2f}"
        else:
            line = f"{entry['status']} {entry['name']}" + (f": {entry['reason']}" if entry.get("reason") else "")
        self._print(line)

    def _print_progress(self, entry: dict, progress) -> None:
        """A line with a running point's newest progress, PROGRESS_EVERY seconds or more after its last line."""
        if progress is None:
            return
        step, at = self._progress_shown.get(entry["name"], (None, self._started))
        if progress.get("step") == step or time.monotonic() - at < PROGRESS_EVERY:
            return
        self._progress_shown[entry["name"]] = (progress.get("step"), time.monotonic())
        self._print(f"  {entry['name']}: {progress_text(progress)}")

    def _print(self, line: str) -> None:
        elapsed = time.monotonic() - self._started
        self.progress.console.print(f"[{elapsed:6.0f} s] {line}", soft_wrap=True, highlight=False)

    def finish(self) -> None:
        self.update()
        self.progress.stop()
        counts = {}
        for entry in self.entries:
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        self.console.print("sweep: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
        for entry in self.entries:
            if entry["status"] == "failed":
                self.console.print(f"  failed {entry['name']}: {entry['reason']}", soft_wrap=True, highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)
