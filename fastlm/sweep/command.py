"""`fastlm sweep`: a grid of training runs in one folder, resumable, ending with a report.

    <out>/sweep.json          the grid, the base configuration, and each point's status (and why it failed)
    <out>/points/<name>/      each point: an ordinary run folder (config.json, metrics.jsonl, checkpoints,
                              train.log with the command it ran and all it printed)
    <out>/report.md, report.json, plots/    the comparison (fastlm.report.command), rewritten at every end

Running the same command again skips the points that are done (or that failed: their reason stands in the
report), resumes the interrupted ones through the train command's own --resume, and starts the rest. A folder
that holds a sweep over another grid or base configuration is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastlm.config import RunConfig
from fastlm.errors import FastlmError
from fastlm.sweep.grid import Grid, points
from fastlm.sweep.progress import SweepProgress
from fastlm.sweep.runner import Runner
from fastlm.train.lock import LOCK_NAME, FolderLock
from fastlm.train.signals import StopRequest

FORMAT, VERSION = "fastlm-sweep", 1
FINISHED = ("done", "failed")
BUDGET_FIELDS = ("max_steps", "max_minutes")



@dataclass
class SweepOptions:
    out: Path
    grid: Grid
    base: RunConfig  # every point's settings but its cell and axis values
    jobs: int = 1
    devices: list[str] = field(default_factory=list)  # default: the base's device
    max_minutes_per_run: Optional[float] = None
    preset: Optional[dict] = None  # the preset's description (fastlm.sweep.presets), or None
    command: Optional[str] = None  # the command line that started it, for the report to quote


def run_sweep(options: SweepOptions, console=None) -> int:
    """Runs the sweep; 0 when every point is done (or paused by its budget), 1 when one failed, 130/143 when
    the sweep was interrupted."""
    grid, base = options.grid.check(), options.base
    if options.jobs < 1:
        raise FastlmError(f"--jobs must be at least 1, got {options.jobs}")
    if options.max_minutes_per_run is not None and not options.max_minutes_per_run > 0:
        raise FastlmError(f"--max-minutes-per-run must be positive, got {options.max_minutes_per_run}")
    devices = options.devices or [base.train.device]
    _share_cores(base, devices, options.jobs)
    planned = points(grid, base)
    configs = {point.name: point.config(base, grid.per_cell) for point in planned}  # refuses bad settings now
    lock = FolderLock(options.out, what="sweep folder", flag="--out").acquire()  # one sweep at a time in a folder
    try:
        return _run(options, grid, base, devices, planned, configs, console)
    finally:
        lock.release()


def _run(options: SweepOptions, grid: Grid, base: RunConfig, devices, planned, configs, console) -> int:
    state = _open(options.out, grid, base, planned, options)
    entries = {entry["name"]: entry for entry in state["points"]}
    todo = [(entries[p.name], configs[p.name]) for p in planned if not _finished(entries[p.name], state["budget"])]
    progress = SweepProgress(options.out, state["points"], console)
    progress.start(len(todo), options.jobs, devices)

    def save() -> None:
        _write(options.out, state)
        progress.update()

    runner = Runner(options.out, devices, options.jobs, state["budget"], on_change=save, on_tick=progress.update)
    signals = _Interrupts(runner)
    started = time.monotonic()
    if todo:  # how many points trained side by side: their training times were measured so
        state["jobs"] = max(state.get("jobs", 1), options.jobs)
    with signals:
        runner.run(todo)
    # The study's wall time, over every invocation that ran points (a resumed sweep adds its own).
    state["wall_seconds"] = state.get("wall_seconds", 0.0) + (time.monotonic() - started if todo else 0.0)
    _write(options.out, state)
    progress.finish()
    _write_report(options.out, progress)
    if signals.requested:
        progress.message(f"sweep interrupted: run the same command (fastlm sweep --out {options.out} ...) to "
                         f"continue; finished points are kept and interrupted ones resume where they stopped")
        return signals.exit_status
    return 1 if any(entry["status"] == "failed" for entry in state["points"]) else 0


def _finished(entry: dict, budget: dict) -> bool:
    """Nothing left to do for a point: it is done, it failed, or its budget ran out and the sweep's budget is the
    one it ran under (a larger --max-steps or --max-minutes-per-run resumes it)."""
    return entry["status"] in FINISHED or (entry["status"] == "budget" and entry.get("budget") == budget)


def _share_cores(base: RunConfig, devices: list[str], jobs: int) -> None:
    """Several CPU jobs at once: split the cores between them unless --threads says otherwise (two jobs with a
    thread per core each would fight over the cores and time the fight)."""
    if jobs > 1 and base.train.threads is None and all(d == "cpu" for d in devices):
        base.train.threads = max(1, len(os.sched_getaffinity(0)) // jobs)


def _identity(grid: dict, base: dict) -> dict:
    """What makes a sweep the same sweep: the grid and the base settings, but for what may change from one
    invocation to the next (budgets, devices, threads)."""
    settings = {section: dict(values) for section, values in base.items()}
    for name in (*BUDGET_FIELDS, "run_dir", "device", "threads"):
        settings["train"].pop(name, None)
    return {"grid": grid, "base": settings}


def _open(out: Path, grid: Grid, base: RunConfig, planned, options: SweepOptions) -> dict:
    """sweep.json's content: the existing sweep's (checked to be the same sweep), or a new one."""
    path = out / "sweep.json"
    identity = _identity(grid.to_dict(), base.to_dict())
    budget = {"max_steps": base.train.max_steps, "max_minutes_per_run": options.max_minutes_per_run}
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != FORMAT:
            raise FastlmError(f"{path} is not a fastlm sweep file; choose another --out")
        before = _identity(Grid.from_dict(state["grid"]).to_dict(), state["base"])
        if before != identity:
            raise FastlmError(f"{out} holds a sweep over another grid or base settings "
                              f"({_difference(before, identity)}); run the same command to continue it, or "
                              f"choose another --out")
        state["budget"] = budget
        return state
    if out.exists() and any(path.name != LOCK_NAME for path in out.iterdir()):
        raise FastlmError(f"{out} exists and is not a sweep folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    entries = [{"name": p.name, "cell": p.cell, "settings": p.settings, "seed": base.train.seed if p.seed is None else p.seed,
                "run_dir": f"points/{p.name}", "status": "pending", "reason": None, "exit_status": None}
               for p in planned]
    state = {"format": FORMAT, "version": VERSION, "grid": grid.to_dict(), "base": base.to_dict(),
             "baseline": grid.baseline(base), "budget": budget,
             "preset": options.preset, "command": options.command, "points": entries}
    _write(out, state)
    return state


def _difference(before: dict, now: dict) -> str:
    if before["grid"] != now["grid"]:
        return f"grid {before['grid']} there, {now['grid']} now"
    changed = [f"{section}.{name} {before['base'][section].get(name)!r} there, {value!r} now"
               for section, values in now["base"].items() for name, value in values.items()
               if before["base"][section].get(name) != value]
    return "; ".join(changed[:3])


def _write(out: Path, state: dict) -> None:
    """sweep.json, replaced atomically: a sweep stopped mid-write keeps the previous one."""
    path = out / "sweep.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _write_report(out: Path, progress: SweepProgress) -> None:
    from fastlm.report.command import run_report

    started = time.perf_counter()
    run_report([out], out)
    progress.message(f"report: {out / 'report.md'} ({time.perf_counter() - started:.1f} s)")


class _Interrupts(StopRequest):
    """SIGINT/SIGTERM while the sweep runs: the first passes the signal on to the running points and lets them
    save (the train command's own stop); a second makes them exit at once."""

    def __init__(self, runner: Runner):
        super().__init__()
        self.runner = runner

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        self.runner.request_stop(signum)
