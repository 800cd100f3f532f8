"""No result lost to a late kill: a run SIGKILLed after its last epoch's checkpoint, during the final test of its
best model, is finished by `--resume` (the test and the final records), to the very test perplexity of a run
that was never interrupted."""

import json
import signal
import subprocess
import sys

from tests.helpers import ROOT, SMALL, one_line_error, run_cli

# `fastlm ...` in a process that SIGKILLs itself when the final test of the best model begins (the evaluation
# test_best runs: uninterruptible, unlike a pause's).
KILLED_IN_FINAL_TEST = """
import os, signal, sys
from fastlm.cli import main
from fastlm.train.trainer import Trainer

evaluate = Trainer.evaluate

def killed_in_final_test(self, stream, split, interruptible=True, batches=None):
    if split == "test" and not interruptible:
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(self, stream, split, interruptible, batches)

Trainer.evaluate = killed_in_final_test
sys.exit(main(sys.argv[1:]))
"""


def records(run, kind):
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_sigkill_during_the_final_test_then_resume_gives_the_uninterrupted_test_ppl(toy_data, tmp_path):  # noqa: F811
    train = ("train", "--data", toy_data, *SMALL, "--epochs", 2, "--steps-per-epoch", 10, "--log-interval", 5)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    status, _, err = run_cli(*train, "--run-dir", straight)
    assert status == 0, err

    result = subprocess.run([sys.executable, "-c", KILLED_IN_FINAL_TEST, *map(str, train), "--run-dir", str(killed)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert len(records(killed, "epoch")) == 2 and not records(killed, "test"), "killed before its test"

    resumed = subprocess.run([sys.executable, "-m", "fastlm", "train", "--resume", str(killed)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "test ppl" in resumed.stdout
    (test,), (expected,) = records(killed, "test"), records(straight, "test")
    assert test["test_ppl"] == expected["test_ppl"] and test["step"] == expected["step"]
    assert len(records(killed, "epoch")) == 2, "finishing trains nothing"

    # Now it is finished: another resume has nothing to do, and says why.
    line = one_line_error(*run_cli("train", "--resume", killed)[::2])
    assert "tested its best model" in line and "--epochs 3" in line
