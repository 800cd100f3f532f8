"""What a user watches while a sweep runs: points done of all, the running points with their epoch and latest
validation perplexity, and the time left at the rate so far.

Each point's start, each of its epochs and its end are a printed line (with the seconds since the sweep
started); on a terminal a progress bar below them counts the points and estimates the time left. The running
points' figures are read from their metrics.jsonl.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fastlm.report.collect import read_metrics


def latest_epoch(records: list[dict]):
    """(epoch, its validation ppl) of the newest epoch or pause record, or None."""
    for record in reversed(records):
        if record.get("kind") in ("epoch", "pause"):
            return record["epoch"], record["val_ppl"]
    return None


class SweepProgress:
    def __init__(self, out: Path, entries: list[dict], console: Console | None = None):
        self.out, self.entries = out, entries
        self.console = console or Console()
        self.progress = Progress(TextColumn("points"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[running]}"), TimeRemainingColumn(),
                                 console=self.console, disable=not self.console.is_terminal)
        self._task = None
        self._shown: dict[str, tuple] = {}  # name -> (status, latest epoch) last printed
        self._read: dict[Path, tuple] = {}  # metrics.jsonl -> ((size, mtime) when read, its latest epoch)
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
            epoch = self._latest_epoch(self.out / entry["run_dir"]) if entry["status"] == "running" else None
            if entry["status"] == "running":
                running.append(entry["name"] + (f" epoch {epoch[0]} ppl {epoch[1]:.1f}" if epoch else ""))
            self._print_change(entry, epoch)
        self.progress.update(self._task, completed=self._completed(), running=" | ".join(running))

    def _latest_epoch(self, run_dir: Path):
        """latest_epoch of a running point, re-read only when its metrics.jsonl changed (this runs 5 times a
        second; a line the child is still writing is skipped by read_metrics)."""
        path = run_dir / "metrics.jsonl"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_size, stat.st_mtime_ns)
        if self._read.get(path, (None,))[0] != seen:
            self._read[path] = (seen, latest_epoch(read_metrics(path)))
        return self._read[path][1]

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
        elif entry["status"] == "running":
            line = f"  {entry['name']}: epoch {epoch[0]} valid ppl {epoch[1]:.2f}"
        else:
            line = f"{entry['status']} {entry['name']}" + (f": {entry['reason']}" if entry.get("reason") else "")
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
