"""Stopping a real `fastlm train` process with signals, and refusing checkpoints that would run code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastlm.errors import FastlmError
from fastlm.train.checkpoint import VERSION, load_checkpoint
from tests.helpers import ROOT, SMALL


def wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"fastlm exited early ({proc.returncode}): {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for the run to get going")


def epochs_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(json.loads(line)["kind"] == "epoch" for line in metrics.read_text().splitlines() if line)


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_last_tests_best_and_exits(toy_data, tmp_path, signum, status):  # noqa: F811
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastlm", "train", "--data", str(toy_data), *map(str, SMALL),
                             "--epochs", "1000", "--log-interval", "5", "--run-dir", str(run)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: epochs_done(run) >= 1, 120, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "test ppl" in out
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["step"] >= best["step"] > 0
    assert not list(run.glob(".*.tmp")), "no temporary checkpoint files left behind"
    # The stop is resumable: a resumed run picks up at the saved step.
    resumed = subprocess.run([sys.executable, "-m", "fastlm", "train", "--resume", str(run), "--max-steps",
                              str(last["step"] + 3)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "last.pt")["step"] == last["step"] + 3


class RunsCode:
    """Unpickling this calls os.system: exactly what a checkpoint must never be allowed to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "fastlm-checkpoint", "version": VERSION, "payload": RunsCode(marker)}, path)
    with pytest.raises(FastlmError, match="refused") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists(), "loading the checkpoint ran code"
    result = subprocess.run([sys.executable, "-m", "fastlm", "generate", "--checkpoint", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
