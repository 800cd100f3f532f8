"""Running a sweep's points: each an ordinary `fastlm train` in a process of its own, up to ``jobs`` at once.

Why processes: a point that crashes, runs out of memory or diverges ends its own process, not the sweep; each
job gets its own device; and the train command's own resume continues an interrupted point exactly.

A point's outcome comes from its process's exit status: 0 is done (or, when its metrics end with a pause, its
budget ran out: "budget"), 130/143 an interruption, anything else a failure whose reason is the last
``fastlm: error:`` line of its log (a divergence, a setting the data cannot take) or the last line written.
Children run in their own session, so a Ctrl-C at the terminal reaches the sweep alone; the sweep passes one
SIGINT on to each running point, which then finishes its step, saves ``last`` and exits. A second Ctrl-C
stops them at once. A sweep that is killed outright (SIGKILL) takes its points along: each is sent SIGTERM
when the sweep dies, and saves and stops as above. A point killed by a signal (the OOM killer, a SIGKILL) is
interrupted, not failed: the next run of the sweep resumes it. A point whose run folder is held by a live
process (fastlm.train.lock: a point of a killed sweep still saving) waits until it is free. The signal handler only records the request (``request_stop``); the runner's loop passes
it on, between its own steps, so that no process is started or collected half-way through a signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fastlm.config import write_toml
from fastlm.device import SWEEP_THREADS
from fastlm.report.collect import plain_status, read_json, read_metrics
from fastlm.train.lock import holder_of

INTERRUPTED = (130, 143)


@dataclass
class PointRun:
    """A point's process while it runs."""

    entry: dict  # the point's entry in sweep.json, updated in place
    process: subprocess.Popen
    device: str
    log: object  # the open train.log


def train_command(entry: dict, folder: Path, config, device: str, budget: dict) -> list[str]:
    """The `fastlm train` invocation for a point: a fresh run, or a resume of its interrupted one."""
    run_dir = folder / entry["run_dir"]
    budgets = []
    if budget.get("max_steps"):
        budgets += ["--max-steps", str(budget["max_steps"])]
    if budget.get("max_minutes_per_run"):
        budgets += ["--max-minutes", str(budget["max_minutes_per_run"])]
    if (run_dir / "last.pt").is_file():
        return [sys.executable, "-m", "fastlm", "train", "--resume", str(run_dir), "--device", device, *budgets]
    run_dir.mkdir(parents=True, exist_ok=True)
    config.train.device = device
    write_toml(config, run_dir / "point.toml")
    # --overwrite: a point cut short before its first checkpoint left a folder this sweep owns; start it afresh.
    return [sys.executable, "-m", "fastlm", "train", "--config", str(run_dir / "point.toml"), "--run-dir",
            str(run_dir), "--overwrite", *budgets]


def outcome(exit_status: int, run_dir: Path) -> tuple[str, Optional[str]]:
    """(status, reason) of a point whose process ended with ``exit_status``."""
    if exit_status == 0:
        return ("budget" if _last_record(run_dir).get("kind") == "pause" else "done"), None
    if exit_status in INTERRUPTED:
        return "interrupted", None
    if exit_status < 0:  # killed by a signal (SIGKILL, the OOM killer): nothing wrong with the point itself
        return "interrupted", f"killed by {_signal_name(-exit_status)}"
    return "failed", _reason(run_dir / "train.log", exit_status)


def _last_record(run_dir: Path) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    return records[-1] if records else {}


def finished_run(run_dir: Path) -> bool:
    """The run in ``run_dir`` trained all its epochs and tested its best model (a signal's stop also tests the
    best model, so the test record alone does not say it)."""
    config = run_dir / "config.json"
    return config.is_file() and plain_status(read_json(config), read_metrics(run_dir / "metrics.jsonl")) == "done"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _die_with_the_sweep(sweep_pid: int) -> None:
    """In a point's process before it starts: SIGTERM it when the sweep's process ends, however it ends (Linux's
    parent-death signal), so that a killed sweep leaves no point training on its own."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != sweep_pid:  # the sweep died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _reason(log: Path, exit_status: int) -> str:
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()] if log.is_file() else []
    errors = [line.removeprefix("fastlm: error: ") for line in lines if line.startswith("fastlm: error: ")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit status {exit_status}: {last}"


class Runner:
    """Starts pending points as job slots free up and collects their outcomes."""

    def __init__(self, folder: Path, devices: list[str], jobs: int, budget: dict,
                 on_change: Callable[[], None], on_tick: Callable[[], None] = lambda: None):
        self.folder, self.devices, self.jobs, self.budget = folder, devices, jobs, budget
        self.on_change = on_change  # called whenever a point starts or ends (to save sweep.json, show progress)
        self.on_tick = on_tick  # called a few times a second while points run (to show their progress)
        self.running: list[PointRun] = []
        self.stopping = False
        self._signals: list[int] = []  # stop requests not passed on yet (set by the signal handler)

    def run(self, todo: list[tuple[dict, object]]) -> None:
        """Runs every (entry, config) of ``todo`` unless stopped; returns when none is left running."""
        queue = list(todo)
        while queue or self.running:
            waiting = []  # points whose run folder another process holds: tried again on the next round
            while queue and len(self.running) < self.jobs and not self.stopping:
                entry, config = queue.pop(0)
                if holder_of(self.folder / entry["run_dir"]) is not None:
                    waiting.append((entry, config))
                    continue
                if finished_run(self.folder / entry["run_dir"]):
                    # It ended before the sweep could note it (the sweep itself was stopped): nothing to resume.
                    entry.update(status="done", reason=None, exit_status=0)
                    self.on_change()
                    continue
                self._start(entry, config)
            queue = waiting + queue
            if self.stopping and not self.running:
                return
            self._pass_on_signals()
            self._collect()
            if self.stopping and not self.running:
                return
            self.on_tick()
            time.sleep(0.2)

    def _start(self, entry: dict, config) -> None:
        in_use = {run.device for run in self.running}
        free = [d for d in self.devices if d not in in_use]
        device = free[0] if free else self.devices[len(self.running) % len(self.devices)]
        command = train_command(entry, self.folder, config, device, self.budget)
        run_dir = self.folder / entry["run_dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "train.log", "a", encoding="utf-8")
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # The threads of the points that may run beside this one: its load warning counts them as the sweep's own
        # work, not other work (a point on a GPU keeps about one CPU thread busy).
        env = {**os.environ, SWEEP_THREADS: str((self.jobs - 1) * (config.train.threads or 1))}
        try:
            sweep_pid = os.getpid()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env=env, preexec_fn=lambda: _die_with_the_sweep(sweep_pid))
        except OSError:
            log.close()
            raise
        entry.update(status="running", reason=None, exit_status=None, device=device, budget=dict(self.budget))
        self.running.append(PointRun(entry, process, device, log))
        self.on_change()

    def _collect(self) -> None:
        for run in [r for r in self.running if r.process.poll() is not None]:
            run.log.close()
            self.running.remove(run)
            status, reason = outcome(run.process.returncode, self.folder / run.entry["run_dir"])
            run.entry.update(status=status, reason=reason, exit_status=run.process.returncode)
            self.on_change()

    def request_stop(self, signum: int) -> None:
        """From a signal handler: start no more points, and have the loop pass ``signum`` on to the running ones
        (a second request: they exit at once)."""
        self.stopping = True
        self._signals.append(signum)

    def _pass_on_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            for run in self.running:
                if run.process.poll() is None:
                    run.process.send_signal(signum)

