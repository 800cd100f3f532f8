"""A run stopped by its budget (--max-steps, --max-minutes) is paused, not ended: resumed, it is the uninterrupted
run step for step. And a run folder holds one run."""

import json
import time

import pytest
import torch

from fastlm.train.checkpoint import load_checkpoint
from fastlm.train.command import resume_config
from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer
from tests.helpers import one_line_error, quiet_display, run_cli, small_config, toy_corpus, write_corpus_folder

CORPUS = toy_corpus(lines=(150, 40, 40))  # 15 batches an epoch at batch 8, bptt 12


def config_with(**train):
    """Dropout on (so the RNG must resume exactly), lr 40 (so the schedule anneals within a few epochs)."""
    return small_config(model={"dropout": 0.2}, train={"epochs": 4, "lr": 40.0, **train})


def train(config, folder, resume=False, on_step=None):
    """One invocation as `fastlm train` makes it; returns (per-step losses, trainer)."""
    losses = []
    if resume:
        config, payload, _ = resume_config(folder, {})
    trainer = Trainer(config, CORPUS, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: (losses.append(loss.item()), on_step and on_step(step)))
    if resume:
        trainer.restore(payload, folder / "last.pt")
    trainer.result = trainer.fit(RunFolder(folder))
    return losses, trainer


def records(folder, kind):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    losses, trainer = train(config_with(), folder)
    annealed = [r["epoch"] for r in records(folder, "epoch") if not r["best"]]
    assert annealed and annealed[0] <= 3, "the reference run must anneal its lr early for these tests to mean it"
    return losses, trainer, folder


def assert_same_run(split_losses, split, split_folder, uninterrupted):
    """Bit for bit on CPU: every step's loss, every epoch's validation, the schedule, the final weights."""
    full_losses, full, full_folder = uninterrupted
    assert split_losses == full_losses
    def untimed(folder):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records(folder, "epoch")]

    assert untimed(split_folder) == untimed(full_folder)
    assert records(split_folder, "test") == records(full_folder, "test")
    for name, value in full.model.state_dict().items():
        assert torch.equal(split.model.state_dict()[name], value), name


@pytest.mark.parametrize("pause_at", [5, "after the first annealing"])
def test_a_max_steps_pause_resumes_step_for_step(pause_at, uninterrupted, tmp_path):
    full_losses, _, full_folder = uninterrupted
    if pause_at != 5:  # inside the epoch that follows the first lr change
        first_annealed = next(r for r in records(full_folder, "epoch") if not r["best"])
        pause_at = first_annealed["step"] + 4
    first, paused = train(config_with(max_steps=pause_at), tmp_path)
    assert len(first) == pause_at and paused.result.pause is not None and paused.result.test_loss is None
    pause = records(tmp_path, "pause")
    assert [(r["step"], r["epoch"]) for r in pause] == [(pause_at, paused.epoch)] and paused.batches_done > 0
    assert not records(tmp_path, "test")  # the best model is tested when training ends, not at a pause
    rest, resumed = train(config_with(), tmp_path, resume=True)
    assert_same_run(first + rest, resumed, tmp_path, uninterrupted)


def test_a_max_minutes_pause_resumes_step_for_step(uninterrupted, tmp_path):
    """A 0.2 s budget with steps slowed to 50 ms: the pause lands a few steps into epoch 1 (earlier, never
    later, on a loaded machine)."""
    first, paused = train(config_with(max_minutes=0.2 / 60), tmp_path, on_step=lambda step: time.sleep(0.05))
    assert 0 < len(first) < 15 and paused.result.pause is not None
    rest, resumed = train(config_with(), tmp_path, resume=True)
    assert_same_run(first + rest, resumed, tmp_path, uninterrupted)


def test_the_pause_validation_changes_nothing_training_depends_on(tmp_path):
    _, paused = train(config_with(max_steps=5), tmp_path)
    payload = load_checkpoint(tmp_path / "last.pt")
    assert (payload["epoch"], payload["batches_done"], payload["lr"], payload["best_val_loss"]) == (1, 5, 40.0, None)
    assert not (tmp_path / "best.pt").exists() and not records(tmp_path, "epoch")
    pause = records(tmp_path, "pause")[0]
    assert pause["val_loss"] == paused.result.pause["val_loss"] and pause["test_ppl"] > 1


# ------------------------------------------------------------------------------------ through the command line

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus_folder(CORPUS, tmp_path_factory.mktemp("data"))


def cli_train(data, run_dir, *flags):
    return run_cli("train", "--data", data, "--device", "cpu", "--emsize", 32, "--nhid", 32, "--batch-size", 8,
                   "--bptt", 12, "--eval-batch-size", 4, "--run-dir", run_dir, *flags)


def test_an_existing_run_folder_is_refused_and_left_untouched(data, tmp_path):
    run_dir = tmp_path / "run"
    assert cli_train(data, run_dir, "--max-steps", 3)[0] == 0
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    status, _, err = cli_train(data, run_dir, "--max-steps", 3)
    line = one_line_error(status, err)
    assert "already holds a run" in line and f"--resume {run_dir}" in line and "--overwrite" in line
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before
    status, _, err = cli_train(data, run_dir, "--max-steps", 2, "--overwrite")
    assert status == 0, err
    assert [r["step"] for r in records(run_dir, "pause")] == [2]  # the old run's records are gone


def test_a_run_never_tests_a_best_model_it_did_not_write(tmp_path):
    """A folder with another run's best.pt (as an interrupted --overwrite could leave, or a user copy): a run
    stopped before its own first validation reports no test perplexity."""
    train(config_with(epochs=1), tmp_path / "other")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.pt").write_bytes((tmp_path / "other" / "best.pt").read_bytes())
    trainer = Trainer(config_with(), CORPUS, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: step == 2 and trainer.stop.request())
    result = trainer.fit(RunFolder(folder))
    assert result.exit_status == 130 and result.test_loss is None and not records(folder, "test")


def test_resume_with_a_lower_lr_continues_and_records_the_change(data, tmp_path):
    run_dir = tmp_path / "run"
    assert cli_train(data, run_dir, "--max-steps", 4, "--lr", 20, "--log-interval", 2)[0] == 0
    status, _, err = run_cli("train", "--resume", run_dir, "--lr", 5, "--clip", 0.1, "--max-steps", 8)
    assert status == 0, err
    history = json.loads((run_dir / "config.json").read_text())["resumes"]
    assert history == [{"epoch": 1, "batch": 4, "step": 4, "changed": {"lr": [20.0, 5.0], "clip": [0.25, 0.1]},
                        "processes": 1}]
    assert records(run_dir, "resume")[0]["changed"] == {"lr": [20.0, 5.0], "clip": [0.25, 0.1]}
    assert [r["lr"] for r in records(run_dir, "log")] == [20.0, 20.0, 5.0, 5.0]
    payload = load_checkpoint(run_dir / "last.pt")
    assert (payload["step"], payload["lr"], payload["config"]["train"]["clip"]) == (8, 5.0, 0.1)


@pytest.mark.parametrize("flags, words", [
    (("--max-steps", 4), ("--max-steps 4 leaves nothing", "--max-steps 5 or more")),
    (("--epochs", 0), ("--epochs",)),
])
def test_a_resume_budget_below_what_is_done_is_refused(data, tmp_path, flags, words):
    run_dir = tmp_path / "run"
    assert cli_train(data, run_dir, "--max-steps", 4)[0] == 0
    line = one_line_error(*run_cli("train", "--resume", run_dir, *flags)[::2])
    assert all(word in line for word in words), line


def test_a_finished_run_asks_for_more_epochs(data, tmp_path):
    run_dir = tmp_path / "run"
    assert cli_train(data, run_dir, "--epochs", 1)[0] == 0
    line = one_line_error(*run_cli("train", "--resume", run_dir)[::2])
    assert "has finished 1 epoch(s)" in line and "--epochs 2 or more" in line
    status, _, err = run_cli("train", "--resume", run_dir, "--epochs", 2)
    assert status == 0, err
    assert [r["epoch"] for r in records(run_dir, "epoch")] == [1, 2]


def test_the_divergence_advice_is_a_resume_that_works(data, tmp_path):
    """The message after a divergence names a resume with a lower lr; that command is accepted (lr and clip may
    change on resume), and with a sensible lr the run trains on."""
    run_dir = tmp_path / "run"
    status, _, err = cli_train(data, run_dir, "--lr", 1e38, "--clip", 1e38, "--max-steps", 6, "--log-interval", 2)
    assert status == 3, err
    line = err.strip().splitlines()[-1]
    advice = line[line.index("fastlm train --resume"):].split()
    assert advice[:4] == ["fastlm", "train", "--resume", str(run_dir)] and advice[4] == "--lr"
    status, _, err = run_cli(*advice[1:])
    assert status != 2, err  # accepted; at 2.5e37 it diverges again, which is the lr's fault, not the command's
    assert records(run_dir, "resume")[0]["changed"]["lr"] == [1e38, float(advice[5])]
    status, _, err = run_cli("train", "--resume", run_dir, "--lr", 1, "--clip", 0.25, "--max-steps", 8)
    assert status == 0, err
    assert records(run_dir, "pause")[-1]["step"] == 8


def test_a_pause_at_an_epoch_end_reuses_that_epochs_validation(tmp_path):
    """--max-steps at exactly an epoch's end: the epoch validated and saved these weights already."""
    trainer = Trainer(config_with(max_steps=15), CORPUS, torch.device("cpu"), quiet_display())
    evaluated, evaluate = [], trainer.evaluate
    trainer.evaluate = lambda stream, split, *args, **kwargs: (evaluated.append(split),
                                                                evaluate(stream, split, *args, **kwargs))[1]
    result = trainer.fit(RunFolder(tmp_path))
    assert evaluated == ["valid", "test"]
    assert result.pause["val_loss"] == records(tmp_path, "epoch")[0]["val_loss"] and result.pause["batch"] == 0
