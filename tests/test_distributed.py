"""Data-parallel training on torch.distributed (gloo on this CPU): the numbers of one process, one run folder,
exact resume, and a clear stop when a process dies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastlm.cli import _without_option
from fastlm.distributed import World
from fastlm.errors import FastlmError

ROOT = Path(__file__).resolve().parents[1]
# A small run on the generated corpus: global batch 4 (2 columns per process), dropout 0 unless a test says.
RUN = ("train", "--data", "generated", "--device", "cpu", "--emsize", "16", "--nhid", "16", "--batch-size", "4",
       "--eval-batch-size", "2", "--bptt", "8", "--log-interval", "1", "--eval-batches", "20")


def fastlm(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastlm", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("backend, steps", [("cudnn", 8), ("script", 4), ("triton", 3)])
def test_two_processes_train_the_one_process_numbers(tmp_path, backend, steps):
    """Global batch 4 on 2 processes (2 columns each) against 1 process with batch 4, dropout 0: every step's
    loss, the validation loss and the final weights agree to float noise (summation order only), on every
    backend DDP wraps alike (triton interpreted here: fewer steps)."""
    one, two = tmp_path / "one", tmp_path / "two"
    for run, extra in ((one, ()), (two, ("--nproc", 2))):
        result = fastlm(*RUN, "--dropout", 0, "--max-steps", steps, "--backend", backend, "--eval-batches", 4,
                        "--run-dir", run, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    losses = [[r["loss"] for r in records(run, "log")] for run in (one, two)]
    assert len(losses[0]) == steps and len(set(losses[0])) == steps
    assert max(abs(a - b) / a for a, b in zip(*losses)) <= 1e-5
    valid = [records(run, "pause")[0]["val_loss"] for run in (one, two)]
    assert abs(valid[0] - valid[1]) / valid[0] <= 1e-6
    assert max_difference(weights(one), weights(two)) <= 1e-5
    # The checkpoint holds the whole batch's hidden state, columns in the one-process order (rank 0's share
    # first): a run saved by 2 processes resumes on 1, or the other way round.
    hidden = [torch.load(run / "last.pt", weights_only=True)["hidden"] for run in (one, two)]
    for a, b in zip(*hidden):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5
    # The gradient all-reduce is a part of backward's time in every log line of the 2-process run.
    assert all(r["phases_ms"]["allreduce"] is not None for r in records(two, "log"))
    assert json.loads((two / "config.json").read_text())["processes"] == 2


def test_nproc_dry_run_leaves_one_run_folder_one_metrics_file_one_set_of_checkpoints(tmp_path):
    result = fastlm(*RUN, "--dry-run", "--nproc", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1, folders
    assert sorted(p.name for p in folders[0].iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    kinds = [r["kind"] for r in map(json.loads, (folders[0] / "metrics.jsonl").read_text().splitlines())]
    assert kinds.count("epoch") == 1 and kinds.count("test") == 1  # once, not once per process
    assert result.stdout.count("End of training") == 1


def test_a_distributed_run_stopped_and_resumed_goes_on_exactly(tmp_path):
    """With dropout (each process draws its own masks): 3 steps, pause, resume to 6 equals 6 straight."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert fastlm(*RUN, "--max-steps", 6, "--run-dir", straight, "--nproc", 2).returncode == 0
    first = fastlm(*RUN, "--max-steps", 3, "--run-dir", split, "--nproc", 2)
    assert first.returncode == 0, first.stderr[-2000:]
    second = fastlm("train", "--resume", split, "--max-steps", 6, "--nproc", 2)
    assert second.returncode == 0, second.stderr[-2000:]
    assert [r["loss"] for r in records(split, "log")] == [r["loss"] for r in records(straight, "log")]
    assert max_difference(weights(split), weights(straight)) == 0.0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def processes_with_rank(rank: int, launcher: int) -> list[int]:
    """The pids of this launch's processes whose environment says RANK=<rank>."""
    found = []
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            found.append(pid)
    return found


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_process_stops_the_run_with_a_clear_message_in_bounded_time(tmp_path, how):
    """Process 1 is killed (or stopped, as a hung process would be) mid-run; the launch ends within a bound
    (--dist-timeout 5 for a hang, plus torchrun's own shutdown), not never, and says what happened."""
    run = tmp_path / "run"
    command = [*RUN, "--max-steps", 100000, "--dist-timeout", 5, "--run-dir", run, "--nproc", 2]
    launcher = subprocess.Popen([sys.executable, "-m", "fastlm", *map(str, command)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not records(run, "log"):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        victims = processes_with_rank(1, launcher.pid)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        output, _ = launcher.communicate(timeout=120)
        seconds = time.monotonic() - started
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert seconds < 90, seconds
    # Process 0 says what happened in one line: a peer gone (killed) or silent past --dist-timeout (hung).
    assert "fastlm: error: process 0 of 2 lost the others" in output, output[-3000:]


def test_batch_columns_are_shared_out_or_refused():
    assert World(1, 2, 1).columns(20) == slice(10, 20)
    with pytest.raises(FastlmError, match="--batch-size 20 does not divide among 3 processes"):
        World(0, 3, 0).columns(20)


def test_nproc_is_taken_out_of_the_command_torchrun_runs():
    assert _without_option(["train", "--nproc", "2", "--lr", "5"], "--nproc") == ["train", "--lr", "5"]
    assert _without_option(["train", "--nproc=2", "--dry-run"], "--nproc") == ["train", "--dry-run"]


def test_example_step_refuses_several_processes():
    from fastlm.config import RunConfig
    from fastlm.model import RNNLM
    from fastlm.step import make_train_step

    config = RunConfig()
    config.update({"model": {"emsize": 8, "nhid": 8}, "train": {"step": "example"}}, "test")
    with pytest.raises(FastlmError, match="one process"):
        make_train_step(RNNLM(20, config.validate().model), config.train, World(0, 2, 0))


def test_profile_under_torchrun_reports_each_rank(tmp_path):
    out = tmp_path / "profile"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fastlm",
               "profile", "--data", "generated", "--device", "cpu", "--emsize", "16", "--nhid", "16",
               "--batch-size", "4", "--eval-batch-size", "2", "--bptt", "8", "--warmup", "2", "--steps", "4",
               "--trace-steps", "0", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        data = json.loads((out / f"rank{rank}" / "breakdown.json").read_text())
        assert (data["rank"], data["processes"]) == (rank, 2)
        assert 0.9 <= data["coverage"] <= 1.1  # the loss's and the gradients' all-reduce are timed too
        assert data["backward_parts"]["allreduce"]["mean_ms"] > 0


def test_ctrl_c_to_nproc_stops_every_process_after_saving(tmp_path):
    """SIGINT to `fastlm train --nproc 2` reaches the workers through torchrun: they agree to stop at the next
    step (on CPU they agree every step), rank 0 saves last.pt, and the command waits for them and exits 130."""
    run = tmp_path / "run"
    command = [*RUN, "--max-steps", 100000, "--log-interval", 100000, "--run-dir", run, "--nproc", 2]
    launcher = subprocess.Popen([sys.executable, "-m", "fastlm", *map(str, command)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.json").is_file() or not processes_with_rank(1, launcher.pid):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        time.sleep(3)  # into the training loop
        workers = processes_with_rank(0, launcher.pid) + processes_with_rank(1, launcher.pid)
        os.kill(launcher.pid, signal.SIGINT)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, output[-3000:]
    assert "stopped at epoch 1" in output and (run / "last.pt").is_file(), output[-3000:]
    assert len(workers) == 2 and not any(alive(pid) for pid in workers)  # no worker outlives the command


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_batch_that_does_not_divide_is_refused_before_torchrun_starts():
    result = fastlm(*RUN, "--batch-size", 5, "--nproc", 2)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fastlm: error: --batch-size 5 does not divide among 2 processes; give a multiple of 2 (each process "
        "takes an equal share of the batch's columns)"]


def test_an_unwritable_save_path_is_refused_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    for extra in ((), ("--nproc", 2)):
        result = fastlm(*RUN, "--dry-run", "--run-dir", tmp_path / f"run{len(extra)}", "--save",
                        tmp_path / "a-file" / "best.pt", *extra)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"fastlm: error: --save {tmp_path / 'a-file' / 'best.pt'}: cannot create or write folder "
            f"{tmp_path / 'a-file'}; choose another path"]


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error(tmp_path):
    from fastlm.train.checkpoint import save_checkpoint

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FastlmError, match="cannot write checkpoint .*a-file/last.pt"):
        save_checkpoint(tmp_path / "a-file" / "last.pt", {"model": {}})


def test_rank_zero_failures_reach_every_rank(monkeypatch):
    """What rank 0 alone does (writing a checkpoint) and fails at: rank 0 raises its own error, the others a
    FastlmError saying so, at once, instead of waiting in their next collective until the timeout."""
    from fastlm import distributed

    sent = []
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, world: sent.append(value) or value)

    def disk_full():
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        distributed.on_rank_zero(disk_full, World(0, 2, 0))
    assert sent == [("error", "process 0 failed: [Errno 28] No space left on device")]
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, world: sent[0])
    with pytest.raises(FastlmError, match="process 0 failed: .*No space left"):
        distributed.on_rank_zero(disk_full, World(1, 2, 1))
