"""The command line: end-to-end runs and the one-line errors users get for bad input."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, SMALL, one_line_error, run_cli


def fastlm(*args, cwd=None, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fastlm", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *words):
    """``result``: a subprocess's CompletedProcess or run_cli's (status, stdout, stderr)."""
    status, stderr = (result[0], result[2]) if isinstance(result, tuple) else (result.returncode, result.stderr)
    line = one_line_error(status, stderr)
    for word in words:
        assert word in line, line


@pytest.mark.perf
def test_help_is_fast():
    start = time.perf_counter()
    result = fastlm("--help")
    assert result.returncode == 0 and "train" in result.stdout
    # A fresh interpreter costs ~50 ms; importing torch would add well over a second.
    assert time.perf_counter() - start < 1.0


def test_train_writes_the_run_folder(toy_data, tmp_path):
    run = tmp_path / "run"
    result = fastlm("train", "--data", toy_data, *SMALL, "--epochs", 2, "--log-interval", 10, "--run-dir", run)
    assert result.returncode == 0, result.stderr
    assert "test ppl" in result.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["emsize"] == 16 and config["data"]["bptt"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if r["kind"] == "log"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    tests = [r for r in records if r["kind"] == "test"]
    assert logs and len(epochs) == 2 and len(tests) == 1
    for key in ("step", "loss", "ppl", "lr", "ms_per_batch", "tokens_per_s"):
        assert all(key in r for r in logs), key
    for key in ("epoch", "val_loss", "val_ppl", "seconds"):
        assert all(key in r for r in epochs), key
    assert tests[0]["test_ppl"] > 1
    for name in ("best.pt", "last.pt"):
        payload = torch.load(run / name, weights_only=True)
        assert payload["format"] == "fastlm-checkpoint" and "encoder.weight" in payload["model"]


def test_dry_run_and_config_file(toy_data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\ncell = "gru"\nnhid = 16\nemsize = 16\n[data]\nbptt = 5\n', encoding="utf-8")
    run = tmp_path / "run"
    status, _, err = run_cli("train", "--config", config, "--data", toy_data, "--bptt", 6, "--dry-run", "--run-dir",
                             run, "--device", "cpu")
    assert status == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["cell"] == "gru" and saved["model"]["nhid"] == 16  # from the file
    assert saved["data"]["bptt"] == 6  # the flag overrides the file


@pytest.mark.slow
def test_generate_writes_utf8(toy_data, tmp_path):
    run = tmp_path / "run"
    assert fastlm("train", "--data", toy_data, *SMALL, "--epochs", 1, "--run-dir", run).returncode == 0
    out = tmp_path / "words.txt"
    result = fastlm("generate", "--checkpoint", run / "best.pt", "--words", 45, "--seed", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    words = out.read_text(encoding="utf-8").split()
    assert len(words) == 45
    again = fastlm("generate", "--checkpoint", run / "best.pt", "--words", 45, "--seed", 3)
    assert again.stdout.split() == words  # seeded: the same text


@pytest.mark.parametrize("flags, words", [
    (("--tied", "--emsize", 16, "--nhid", 32), ("--tied", "emsize")),
    (("--batch-size", 0), ("--batch-size",)),
    (("--bptt", 0), ("--bptt",)),
    (("--bptt", 100000), ("--bptt", "larger")),
    (("--batch-size", 10 ** 7), ("--batch-size", "too large")),
    (("--dropout", 1.5), ("--dropout",)),
    (("--lr", -1), ("--lr",)),
    (("--model", "transformer"), ("--cell", "transformer")),
    (("--backend", "nonesuch"), ("nonesuch", "available")),
    (("--batch-size", "many"), ("--batch-size", "invalid")),
])
def test_bad_flags_are_one_line_errors(toy_data, tmp_path, flags, words):
    result = run_cli("train", "--data", toy_data, "--device", "cpu", "--run-dir", tmp_path / "run", *flags)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "run").exists()  # nothing half-made left behind


def test_a_refused_run_exits_the_process_with_status_2(toy_data, tmp_path):
    """The in-process checks above, through `python -m fastlm` once: the exit status reaches the shell."""
    result = fastlm("train", "--data", toy_data, "--device", "cpu", "--run-dir", tmp_path / "run", "--bptt", 0)
    assert_one_line_error(result, "--bptt")


def _folder(tmp_path, **files):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in files.items():
        (folder / f"{name}.txt").write_bytes(content)
    return folder


GOOD = b"a b c\nd e f\n" * 50


@pytest.mark.parametrize("make, words", [
    (lambda t: t / "absent", ("absent", "no data folder")),
    (lambda t: _folder(t, train=GOOD, valid=GOOD), ("test.txt",)),
    (lambda t: _folder(t, train=GOOD, valid=b"", test=GOOD), ("valid.txt", "empty")),
    (lambda t: _folder(t, train=GOOD, valid=GOOD, test=b"ok\n\xff\xfe bad\n"), ("test.txt", "UTF-8")),
])
def test_bad_data_is_a_one_line_error(tmp_path, make, words):
    result = run_cli("train", "--data", make(tmp_path), "--device", "cpu", "--dry-run", "--run-dir", tmp_path / "r")
    assert_one_line_error(result, *words)


@pytest.mark.parametrize("content, words", [
    (b"this is not a checkpoint", ("corrupt",)),
    (None, ("not a fastlm checkpoint",)),
])
def test_generate_refuses_bad_checkpoints(tmp_path, content, words):
    path = tmp_path / "model.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # a foreign, but loadable, file
    else:
        path.write_bytes(content)
    assert_one_line_error(run_cli("generate", "--checkpoint", path), *words)


def test_generate_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("generate", "--checkpoint", tmp_path / "nope.pt"), "does not exist")


def test_generate_from_a_run_without_a_best_model_yet_names_its_last_checkpoint(toy_data, tmp_path):
    """A run paused before its first validation (as the README's first command's is) has last.pt, not best.pt."""
    run = tmp_path / "run"
    status, _, err = run_cli("train", "--data", toy_data, *SMALL, "--max-steps", 2, "--run-dir", run)
    assert status == 0 and (run / "last.pt").is_file() and not (run / "best.pt").exists(), err
    assert_one_line_error(run_cli("generate", "--checkpoint", run / "best.pt"), "before its first",
                          f"--checkpoint {run / 'last.pt'}", f"--resume {run}")


@pytest.mark.parametrize("argv, closest", [
    (("train", "--nhidden", 100), "--nhid"),
    (("train", "--nhidden=100"), "--nhid"),
    (("train", "--epoch", 1), "--epochs"),  # an abbreviation is not taken for the flag it abbreviates
    (("bench", "--shapes", "35,20,200,200"), "--shape"),
])
def test_an_unknown_flag_names_the_subcommands_help_and_the_closest_flag(argv, closest):
    line = one_line_error(*run_cli(*argv)[::2])
    assert f"fastlm {argv[0]} --help" in line and f"did you mean {closest}?" in line, line


def test_dry_runs_without_a_run_dir_share_one_folder(toy_data, tmp_path, monkeypatch):
    """A dry run checks that everything runs: without --run-dir the next one replaces its folder, instead of
    leaving a timestamped folder behind each time; a real run in that folder is not replaced."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        status, out, err = run_cli("train", "--data", toy_data, *SMALL, "--dry-run")
        assert status == 0, err
    folder = tmp_path / "runs" / "dry-run-lstm-cudnn"
    assert list((tmp_path / "runs").iterdir()) == [folder] and "the next one replaces it" in out
    assert json.loads((folder / "config.json").read_text())["train"]["dry_run"] is True
    config = json.loads((folder / "config.json").read_text())
    config["train"]["dry_run"] = False  # as if a run had been given this folder with --run-dir
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("train", "--data", toy_data, *SMALL, "--dry-run"), "already holds a run")
