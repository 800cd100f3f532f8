"""Files and flags fastlm does not trust: every damaged, crafted or foreign checkpoint, run folder, report input
and output path is refused with one line (`fastlm: error: ...`, exit status 2), never a traceback, a hang or a
wrong result (fastlm.train.verify, fastlm.paths, fastlm.train.run_folder.read_config)."""

import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fastlm.train.run_folder import RunFolder, read_records
from tests.helpers import ROOT, SMALL, one_line_error, run_cli


def refused(*args) -> str:
    status, _, err = run_cli(*args)
    return one_line_error(status, err)


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):  # noqa: F811
    """A small finished run (two epochs of 6 batches): its folder, best.pt and last.pt."""
    run = tmp_path_factory.mktemp("trained") / "run"
    status, _, err = run_cli("train", "--data", toy_data, *SMALL, "--epochs", 2, "--steps-per-epoch", 6,
                             "--log-interval", 3, "--run-dir", run)
    assert status == 0, err
    return run


def copy_run(trained, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(trained, target)
    return target


def crafted(trained, tmp_path, change, name="crafted.pt"):
    payload = copy.deepcopy(torch.load(trained / "best.pt", weights_only=True))
    change(payload)
    path = tmp_path / name
    torch.save(payload, path)
    return path


CRAFTED = {  # name: (change to a real checkpoint, words of the refusal)
    "config-a-string": (lambda p: p.__setitem__("config", "hello"), ("holds no configuration",)),
    "negative-size": (lambda p: p["config"]["model"].__setitem__("nhid", -5), ("--nhid", "-5")),
    "dropout-a-string": (lambda p: p["config"]["model"].__setitem__("dropout", "abc"), ("--dropout",)),
    "nan-lr": (lambda p: p["config"]["train"].__setitem__("lr", float("nan")), ("--lr",)),
    "backend-a-number": (lambda p: p["config"]["model"].__setitem__("backend", 5), ("--backend",)),
    "nan-weights": (lambda p: p["model"]["encoder.weight"].__setitem__((0, 0), float("nan")), ("non-finite",)),
    "vocab-of-integers": (lambda p: p.__setitem__("vocab", list(range(len(p["vocab"])))), ("vocabulary",)),
    "vocab-altered": (lambda p: p["vocab"].__setitem__(0, "zzz"), ("digest",)),
    "a-weight-missing": (lambda p: p["model"].pop("decoder.bias"), ("lacks decoder.bias",)),
    "a-weight-reshaped": (lambda p: p["model"].__setitem__("decoder.bias", torch.zeros(3)), ("decoder.bias", "[3]")),
    "a-billion-layers": (lambda p: p["config"]["model"].__setitem__("nlayers", 10**9), ("1000000000",)),
    "a-billion-units": (lambda p: p["config"]["model"].__setitem__("nhid", 10**9), ("1000000000",)),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_generate_refuses_a_crafted_checkpoint_at_once(trained, tmp_path, name):
    change, words = CRAFTED[name]
    path = crafted(trained, tmp_path, change)
    started = time.perf_counter()
    line = refused("generate", "--checkpoint", path, "--words", 3)
    assert time.perf_counter() - started < 10, "refused before anything is built or allocated"
    assert all(word in line for word in words), line


@pytest.mark.parametrize("name", ["nan-weights", "vocab-altered", "a-billion-layers", "negative-size"])
def test_resume_refuses_a_crafted_last_pt(trained, tmp_path, name):
    run = copy_run(trained, tmp_path)
    change, words = CRAFTED[name]
    shutil.copy(crafted(trained, tmp_path, change), run / "last.pt")
    line = refused("train", "--resume", run, "--epochs", 3)
    assert all(word in line for word in words), line


@pytest.mark.parametrize("state", [
    lambda p: p.__setitem__("epoch", "x"),
    lambda p: p.__setitem__("hidden", torch.zeros(1)),
    lambda p: p.__setitem__("lr", -1.0),
    lambda p: p.__setitem__("optimizer", None),
], ids=["epoch", "hidden", "lr", "optimizer"])
def test_resume_refuses_a_damaged_training_state(trained, tmp_path, state):
    run = copy_run(trained, tmp_path)
    payload = torch.load(run / "last.pt", weights_only=True)
    state(payload)
    torch.save(payload, run / "last.pt")
    assert "cannot be resumed" in refused("train", "--resume", run, "--epochs", 3)


def test_resume_refuses_checkpoints_of_another_model(toy_data, trained, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    status, _, err = run_cli("train", "--data", toy_data, *SMALL, "--nhid", 24, "--epochs", 1, "--steps-per-epoch",
                             3, "--run-dir", other)
    assert status == 0, err
    for name in ("last.pt", "best.pt"):
        run = copy_run(trained, tmp_path, f"with-foreign-{name}")
        shutil.copy(other / name, run / name)
        line = refused("train", "--resume", run, "--epochs", 3)
        assert "model.nhid" in line and "another run" in line, line


@pytest.mark.parametrize("content, words", [
    (b"garbage", ("not valid JSON",)),
    (b"[1, 2]", ("not a fastlm run configuration",)),
    (b'{"model": "\xff"}', ("not UTF-8",)),
])
def test_resume_refuses_a_damaged_config_json(trained, tmp_path, content, words):
    run = copy_run(trained, tmp_path)
    (run / "config.json").write_bytes(content)
    line = refused("train", "--resume", run, "--epochs", 3)
    assert all(word in line for word in words) and "rebuilds it from last.pt" in line, line


def test_resume_rebuilds_a_deleted_config_json_that_report_then_reads(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (run / "config.json").unlink()
    status, out, err = run_cli("train", "--resume", run, "--epochs", 3)
    assert status == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["nhid"] == 16 and config["vocab_size"] > 0 and config["rebuilt_from"] == "last.pt"
    assert config["resumes"][0]["changed"] == {"epochs": [2, 3]}
    status, _, err = run_cli("report", run, "--out", tmp_path / "report")
    assert status == 0, err


def test_resume_flags_that_name_another_folder_or_change_the_evaluation_are_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    assert "names another" in refused("train", "--resume", run, "--run-dir", tmp_path / "elsewhere", "--epochs", 3)
    assert "--eval-batches" in refused("train", "--resume", run, "--eval-batches", 2, "--epochs", 3)
    assert not (tmp_path / "elsewhere").exists()


def test_a_resume_leaves_no_duplicate_records_and_no_temporary_files(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    with (run / "metrics.jsonl").open("a") as f:  # what a run wrote after its last checkpoint, before a kill
        f.write(json.dumps({"kind": "log", "epoch": 3, "batch": 3, "step": step + 3, "loss": 1.0}) + "\n")
        f.write('{"kind": "log", "step": ')  # a line the kill cut short
    (run / ".last.pt.abc.tmp").write_bytes(b"partial")
    status, _, err = run_cli("train", "--resume", run, "--epochs", 3)
    assert status == 0, err
    steps = [r["step"] for r in read_records(run / "metrics.jsonl") if r["kind"] == "log"]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    assert not list(run.glob(".*.tmp"))


def test_metrics_hold_json_only(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append_metrics({"kind": "log", "loss": 1000.0, "ppl": math.inf, "phases_ms": {"step": math.nan}})
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text(), parse_constant=lambda name: 1 / 0)
    assert record["ppl"] is None and record["phases_ms"]["step"] is None


def test_checkpoint_refusals_say_what_they_are(tmp_path):
    garbage = tmp_path / "random.pt"
    garbage.write_bytes(os.urandom(4096))
    line = refused("generate", "--checkpoint", garbage)
    assert "corrupt" in line and "run code" not in line, line


@pytest.mark.parametrize("args, words", [
    (("--seed", 2**64), ("--seed",)),
    (("--seed", -1), ("--seed",)),
    (("--temperature", float("inf")), ("--temperature",)),
])
def test_generate_flags_out_of_range_are_one_line(trained, args, words):
    line = refused("generate", "--checkpoint", trained / "best.pt", "--words", 3, *args)
    assert all(word in line for word in words), line


def test_a_temperature_so_small_it_underflows_samples_greedily(trained, tmp_path):
    out = tmp_path / "words.txt"
    status, _, err = run_cli("generate", "--checkpoint", trained / "best.pt", "--words", 5, "--temperature", 1e-300,
                             "--out", out)
    assert status == 0, err
    assert len(out.read_text(encoding="utf-8").split()) == 5


def test_train_seed_too_large_for_torch(toy_data, tmp_path):  # noqa: F811
    assert "--seed" in refused("train", "--data", toy_data, *SMALL, "--seed", 2**64, "--dry-run", "--run-dir",
                               tmp_path / "run")


@pytest.mark.parametrize("where", ["folder", "missing-parent", "parent-a-file"])
def test_output_files_that_cannot_be_written_are_refused_first(trained, tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = {"folder": tmp_path, "missing-parent": tmp_path / "no" / "words.txt",
           "parent-a-file": tmp_path / "file" / "words.txt"}[where]
    assert f"--out {out}" in refused("generate", "--checkpoint", trained / "best.pt", "--words", 3, "--out", out)
    if where != "missing-parent":  # bench makes the folders it needs
        assert "--out" in refused("bench", "--device", "cpu", "--mode", "fwd", "--cell", "lstm", "--backend", "cudnn",
                                  "--shape", "2,2,4,4", "--repeat", 1, "--out", out)


@pytest.mark.parametrize("kind", ["file", "symlink-loop", "below-a-file", "empty"])
def test_run_dirs_that_cannot_be_folders_are_one_line(toy_data, tmp_path, kind):  # noqa: F811
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    run_dir = {"file": tmp_path / "file", "symlink-loop": tmp_path / "loop", "below-a-file": tmp_path / "file" / "run",
               "empty": ""}[kind]
    line = refused("train", "--data", toy_data, *SMALL, "--dry-run", "--run-dir", run_dir)
    assert "--run-dir" in line, line


def test_a_file_size_limit_during_a_checkpoint_is_one_line(toy_data, tmp_path):  # noqa: F811
    """`ulimit -f`: the checkpoint write fails (torch words it as an internal assertion); fastlm says why."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run([sys.executable, "-m", "fastlm", "train", "--data", str(toy_data), *map(str, SMALL),
                             "--nhid", "64", "--dry-run", "--run-dir", str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    line = one_line_error(result.returncode, result.stderr)
    assert "ulimit -f" in line, line


# ------------------------------------------------------------------------------------------------ report inputs

@pytest.mark.parametrize("file, content, words", [
    ("config.json", b"[1, 2]", ("JSON object",)),
    ("config.json", b'{"model": "\xff"}', ("cannot read",)),
    ("config.json", b"{}", ("not a fastlm run configuration",)),
    ("config.json", b'{"model": {"cell": "lstm"}, "data": {}, "train": {}, "resumes": [1]}', ("resumes",)),
])
def test_report_on_damaged_run_files_is_one_line(trained, tmp_path, file, content, words):
    run = copy_run(trained, tmp_path)
    (run / file).write_bytes(content)
    line = refused("report", run, "--out", tmp_path / "report")
    assert all(word in line for word in words), line


def test_report_skips_metrics_records_it_cannot_read(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'\xff\xfe\n{"kind": "epoch"}\n{"kind": "epoch", "epoch": "1", "val_ppl": "x"}\n[1]\n')
    status, _, err = run_cli("report", run, "--out", tmp_path / "report")
    assert status == 0, err


def test_report_names_a_sweep_point_whose_folder_is_gone(tmp_path):
    sweep = {"format": "fastlm-sweep", "version": 1, "grid": {"cells": ["lstm"], "axes": {}}, "base": {},
             "budget": {}, "points": [{"name": "lstm", "cell": "lstm", "settings": {}, "run_dir": "points/lstm",
                                       "status": "done"}]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    status, _, err = run_cli("report", tmp_path)
    assert status == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "points/lstm is missing" in text and "Every run finished its epochs" not in text


# ------------------------------------------------------------------------------------------------ --nproc

@pytest.mark.slow
def test_nproc_prints_the_processes_one_line_errors_only(trained, tmp_path):
    """A failure under `--nproc`: fastlm's line (once per process that met it) and its exit status, without
    torchrun's ChildFailedError report after it."""
    run = copy_run(trained, tmp_path)
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["model"]["encoder.weight"][0, 0] = float("nan")
    torch.save(payload, run / "last.pt")
    result = subprocess.run([sys.executable, "-m", "fastlm", "train", "--resume", str(run), "--epochs", "3",
                             "--nproc", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("fastlm: error: ") and "non-finite" in line for line in lines), result.stderr


def test_a_failed_bench_case_says_what_failed():
    """torch's allocator failure opens with "[enforce fail at alloc_cpu.cpp:121] err == 0.": the 60 characters of a
    table cell then said only that. The reason kept is what happened."""
    from fastlm.benchmark.command import case_failure

    error = RuntimeError("[enforce fail at alloc_cpu.cpp:121] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")
    reason = case_failure(error)
    assert reason.startswith("RuntimeError: DefaultCPUAllocator: can't allocate memory") and "err == 0" not in reason
