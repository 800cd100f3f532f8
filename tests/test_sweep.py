"""`fastlm sweep`: the grid, the points as ordinary runs, failures recorded, and an interrupted sweep finished
by running it again, its interrupted point resuming exactly."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fastlm.config import RunConfig
from fastlm.errors import FastlmError
from fastlm.sweep import progress as sweep_progress
from fastlm.sweep.grid import Grid, add_cell_setting, add_setting, points
from fastlm.train.checkpoint import load_checkpoint
from tests.helpers import one_line_error, run_cli, toy_corpus, write_corpus_folder

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--device", "cpu", "--emsize", 16, "--nhid", 16, "--batch-size", 8, "--bptt", 12, "--eval-batch-size", 4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus_folder(toy_corpus(lines=(150, 40, 40)), tmp_path_factory.mktemp("data"))


def records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def sweep_state(out):
    return json.loads((out / "sweep.json").read_text())


# ------------------------------------------------------------------------------------------------ the grid

def test_settings_take_their_fields_types_and_make_one_point_per_cell_and_combination():
    grid = Grid(cells=["lstm", "gru"])
    add_setting(grid, "nlayers=1,2")
    add_setting(grid, "dropout=0.1,0.5")
    add_cell_setting(grid, "gru:lr=5")
    grid.check()
    assert grid.axes == {"nlayers": [1, 2], "dropout": [0.1, 0.5]} and grid.per_cell == {"gru": {"lr": 5.0}}
    found = points(grid)
    assert [p.name for p in found][:2] == ["lstm-nlayers1-dropout0.1", "lstm-nlayers1-dropout0.5"]
    assert len(found) == 8 and {p.cell for p in found} == {"lstm", "gru"}
    gru = next(p for p in found if p.cell == "gru").config(RunConfig(), grid.per_cell)
    lstm = found[0].config(RunConfig(), grid.per_cell)
    assert (gru.model.cell, gru.train.lr, lstm.train.lr, lstm.model.nlayers) == ("gru", 5.0, 20.0, 1)


@pytest.mark.parametrize("setting, words", [
    ("colour=red,blue", "no such setting"),
    ("nlayers=one", "type int"),
    ("run_dir=a,b", "sets run_dir itself"),
    ("nlayers=2,2", "distinct values"),
])
def test_bad_settings_are_refused(setting, words):
    grid = Grid()
    with pytest.raises(FastlmError, match=words):
        add_setting(grid, setting)
        grid.check()


@pytest.mark.parametrize("flags, words", [
    (("--cells", "lstm,transformer"), "--cells"),
    (("--set", "nhid=100", "--set-cell", "rnn_tanh:lr=1"), "--set-cell rnn_tanh"),
    (("--set", "emsize=10", "--tied"), "--tied"),
    (("--run-dir", "x"), "--run-dir"),
    (("--max-minutes", "3"), "--max-minutes-per-run"),
    (("--jobs", "0"), "--jobs"),
])
def test_bad_sweeps_are_one_line_errors_before_anything_runs(data, tmp_path, flags, words):
    status, _, err = run_cli("sweep", "--out", tmp_path / "sweep", "--data", data, *SMALL, *flags)
    assert words in one_line_error(status, err)
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------------------------ running

def test_a_failed_point_is_recorded_and_the_sweep_goes_on(data, tmp_path):
    out = tmp_path / "sweep"
    status, out_text, err = run_cli("sweep", "--out", out, "--data", data, *SMALL, "--epochs", 1,
                                    "--steps-per-epoch", 3, "--eval-batches", 2, "--cells", "lstm",
                                    "--set", "bptt=12,100000")
    assert status == 1, err
    entries = {e["name"]: e for e in sweep_state(out)["points"]}
    assert entries["lstm-bptt12"]["status"] == "done" and entries["lstm-bptt12"]["exit_status"] == 0
    failed = entries["lstm-bptt100000"]
    assert failed["status"] == "failed" and failed["exit_status"] == 2 and "--bptt 100000" in failed["reason"]
    assert records(out / "points" / "lstm-bptt12", "test")  # the other point trained to its end
    assert "failed lstm-bptt100000" in out_text
    report = json.loads((out / "report.json").read_text())
    marked = next(r for r in report["runs"] if r["name"] == "lstm-bptt100000")
    assert marked["status"] == "failed" and "--bptt 100000" in marked["reason"]


def test_a_changed_grid_is_refused_in_an_existing_sweep(data, tmp_path):
    out = tmp_path / "sweep"
    common = ("sweep", "--out", out, "--data", data, *SMALL, "--epochs", 1, "--steps-per-epoch", 2,
              "--eval-batches", 1, "--cells", "gru")
    assert run_cli(*common, "--set", "nlayers=1")[0] == 0
    before = (out / "sweep.json").read_bytes()
    line = one_line_error(*run_cli(*common, "--set", "nlayers=1,2")[::2])
    assert "another grid" in line and "nlayers" in line
    assert (out / "sweep.json").read_bytes() == before
    status, text, _ = run_cli(*common, "--set", "nlayers=1")  # the same sweep again: nothing left to do
    assert status == 0 and "1 finished, 0 to run" in text


@pytest.mark.slow
def test_an_interrupted_sweep_finishes_when_run_again_and_its_point_resumes_exactly(data, tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "fastlm", "sweep", "--out", str(out), "--data", str(data),
               *map(str, SMALL), "--epochs", "3", "--steps-per-epoch", "40", "--log-interval", "1",
               "--cells", "lstm", "--set", "nlayers=1,2", "--design", "grid"]  # grid order: nlayers 1 runs first
    first_point, second = out / "points" / "lstm-nlayers1", out / "points" / "lstm-nlayers2"
    sweep = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((second / "metrics.jsonl").is_file() and len(records(second, "log")) >= 5):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
        time.sleep(0.05)
    sweep.send_signal(signal.SIGINT)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 130, output
    assert "run the same command" in output
    entries = {e["name"]: e["status"] for e in sweep_state(out)["points"]}
    assert entries == {"lstm-nlayers1": "done", "lstm-nlayers2": "interrupted"}
    done_before = (first_point / "metrics.jsonl").read_bytes()
    stopped_at = load_checkpoint(second / "last.pt")["step"]
    assert 5 <= stopped_at < 120

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {e["name"]: e["status"] for e in sweep_state(out)["points"]} == {"lstm-nlayers1": "done",
                                                                            "lstm-nlayers2": "done"}
    assert (first_point / "metrics.jsonl").read_bytes() == done_before  # not trained again
    assert records(second, "resume")[0]["step"] == stopped_at

    # The same point trained in one go: the same step losses, validations, test and weights.
    whole = tmp_path / "whole"
    status, _, err = run_cli("train", "--config", second / "point.toml", "--run-dir", whole)
    assert status == 0, err
    assert ([(r["step"], r["loss"]) for r in records(second, "log")]
            == [(r["step"], r["loss"]) for r in records(whole, "log")])
    assert [r["val_loss"] for r in records(second, "epoch")] == [r["val_loss"] for r in records(whole, "epoch")]
    assert records(second, "test")[-1]["test_loss"] == records(whole, "test")[-1]["test_loss"]
    split_weights = load_checkpoint(second / "last.pt")["model"]
    whole_weights = load_checkpoint(whole / "last.pt")["model"]
    assert all(torch.equal(split_weights[name], value) for name, value in whole_weights.items())


def test_jobs_share_the_cores_and_run_points_side_by_side(data, tmp_path):
    out = tmp_path / "sweep"
    status, _, err = run_cli("sweep", "--out", out, "--data", data, *SMALL, "--epochs", 1, "--steps-per-epoch", 2,
                             "--eval-batches", 1, "--cells", "lstm,gru", "--jobs", 2)
    assert status == 0, err
    cores = len(os.sched_getaffinity(0))
    for entry in sweep_state(out)["points"]:
        config = json.loads((out / entry["run_dir"] / "config.json").read_text())
        assert config["train"]["threads"] == max(1, cores // 2) and entry["status"] == "done"
        # The load each point counts as the sweep's own: its threads and those of the point beside it.
        logs = records(out / entry["run_dir"], "log")
        assert logs and all(r["own_threads"] == 2 * config["train"]["threads"] for r in logs)
    notes = json.loads((out / "report.json").read_text())["conditions"]["notes"]
    assert any("up to 2 points at once" in note for note in notes)  # their training times were measured side by side


def test_points_paused_by_their_budget_go_on_when_the_budget_grows(data, tmp_path):
    out = tmp_path / "sweep"
    common = ("sweep", "--out", out, "--data", data, *SMALL, "--epochs", 1, "--eval-batches", 1, "--cells", "lstm")
    assert run_cli(*common, "--max-steps", 2)[0] == 0
    point = out / sweep_state(out)["points"][0]["run_dir"]
    assert sweep_state(out)["points"][0]["status"] == "budget" and records(point, "pause")[-1]["step"] == 2
    status, text, _ = run_cli(*common, "--max-steps", 2)
    assert status == 0 and "1 finished, 0 to run" in text  # the same budget: nothing left to do
    assert run_cli(*common, "--max-steps", 4)[0] == 0
    assert records(point, "pause")[-1]["step"] == 4 and sweep_state(out)["points"][0]["budget"]["max_steps"] == 4


def test_a_running_points_progress_is_shown_between_its_epochs(tmp_path, monkeypatch):
    """From a point's start to its first epoch's end (minutes on a CPU) the sweep shows its batches, rate and the
    epoch's time left, from the log records of its metrics.jsonl: on the bar, and as a printed line."""
    monkeypatch.setattr(sweep_progress, "PROGRESS_EVERY", 0.0)
    entry = {"name": "lstm", "run_dir": "points/lstm", "status": "running", "device": "cpu"}
    (tmp_path / "points" / "lstm").mkdir(parents=True)
    display = sweep_progress.SweepProgress(tmp_path, [entry], Console(file=io.StringIO(), width=200))
    display.start(1, 1, ["cpu"])
    log = {"kind": "log", "epoch": 1, "batch": 400, "epoch_batches": 2983, "step": 400, "ms_per_batch": 700.0}
    metrics = tmp_path / "points" / "lstm" / "metrics.jsonl"
    metrics.write_text(json.dumps(log) + "\n")
    display.update()
    shown = "epoch 1: 400/2,983 batches, 700 ms/batch, ~30 min left in the epoch"
    assert f"lstm: {shown}" in display.console.file.getvalue()
    assert shown in display.progress.tasks[0].fields["running"]
    epoch = {"kind": "epoch", "epoch": 1, "step": 2983, "val_loss": 5.0, "val_ppl": 148.4}
    metrics.write_text(json.dumps(log) + "\n" + json.dumps(epoch) + "\n")
    display.update()
    assert "lstm: epoch 1 valid ppl 148.40" in display.console.file.getvalue()
    assert "batches" not in display.progress.tasks[0].fields["running"]  # the epoch ended: its figures instead
