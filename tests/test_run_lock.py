"""One writer per run folder (fastlm.train.lock): a second train, resume or sweep on a folder another live process
holds is refused with a line naming that process; a lock left by a killed process does not block."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fastlm.sweep.runner import outcome
from fastlm.train.lock import LOCK_NAME, FolderLock, holder_of
from tests.helpers import ROOT, SMALL, one_line_error, run_cli


def hold_in_another_process(folder):
    """A process that takes ``folder``'s lock and waits; returns it once it holds the lock."""
    code = ("import sys, time\nfrom fastlm.train.lock import FolderLock\nFolderLock(sys.argv[1]).acquire()\n"
            "print('held', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_trainings_in_one_folder_the_second_is_refused_naming_the_first(toy_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "fastlm", "train", "--data", str(toy_data), *map(str, SMALL),
                              "--epochs", "1000", "--run-dir", str(run)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists():  # the folder is made: the run is past its start-up
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run did not start in time"
            time.sleep(0.1)
        for args in (("train", "--data", toy_data, *SMALL, "--run-dir", run, "--overwrite"),
                     ("train", "--data", toy_data, *SMALL, "--run-dir", run),
                     ("train", "--resume", run)):
            line = one_line_error(*run_cli(*args)[::2])
            assert f"in use by process {first.pid}" in line and "--run-dir" in line, line
        assert first.poll() is None, "the refused runs must not disturb the one that holds the folder"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / "config.json").is_file()


def test_a_lock_left_by_a_killed_process_does_not_block(toy_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    holder = hold_in_another_process(run)
    assert holder_of(run)["pid"] == holder.pid
    line = one_line_error(*run_cli("train", "--data", toy_data, *SMALL, "--dry-run", "--run-dir", run)[::2])
    assert f"process {holder.pid}" in line
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_NAME).exists() and holder_of(run) is None  # its file is left, but nobody holds it
    status, _, err = run_cli("train", "--data", toy_data, *SMALL, "--dry-run", "--run-dir", run)
    assert status == 0, err
    assert not (run / LOCK_NAME).exists(), "a run that ends lets go of its folder"


def test_a_lock_is_released_and_a_refused_run_leaves_no_folder(tmp_path):
    folder = tmp_path / "a" / "b"
    lock = FolderLock(folder).acquire()
    assert folder.is_dir() and holder_of(folder)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "a").exists(), "the folders the lock made are removed when nothing was written"


def test_a_lock_cannot_be_taken_twice_in_one_process_either(tmp_path):
    with FolderLock(tmp_path / "run"):
        with pytest.raises(Exception, match=f"in use by process {os.getpid()}"):
            FolderLock(tmp_path / "run").acquire()


def test_one_sweep_at_a_time_in_a_sweep_folder(tmp_path):
    out = tmp_path / "sweep"
    holder = hold_in_another_process(out)
    try:
        line = one_line_error(*run_cli("sweep", "--out", out, "--cells", "lstm", "--epochs", 1, "--device",
                                       "cpu", "--data", "generated")[::2])
        assert f"sweep folder {out} is in use by process {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()


def test_a_point_killed_by_a_signal_is_interrupted_not_failed(tmp_path):
    """A SIGKILL (or the OOM killer) says nothing about the point's settings: the sweep's next run resumes it."""
    assert outcome(-signal.SIGKILL, tmp_path) == ("interrupted", "killed by SIGKILL")
    assert outcome(2, tmp_path)[0] == "failed"
