"""Resuming: a stopped run continued with its last.pt computes the very losses of an unstopped run."""

import json
import math

import pytest
import torch

from fastlm.errors import FastlmError
from fastlm.train.checkpoint import hidden_from_saved, hidden_to_save, load_checkpoint
from fastlm.train.command import resume_config
from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer, TrainingDiverged
from tests.helpers import quiet_display, small_config, toy_corpus


def run(config, corpus, folder, stop_at=None, restore_from=None, on_step=None):
    """Trains; returns (per-step losses, trainer). ``stop_at``: request a stop after that global step."""
    losses = []
    trainer = None

    def record(step, loss):
        losses.append(loss.item())
        if on_step is not None:
            on_step(trainer, step)
        if stop_at is not None and step == stop_at:
            trainer.stop.request()

    trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(), on_step=record)
    if restore_from is not None:
        trainer.restore(load_checkpoint(restore_from), restore_from)
    trainer.result = trainer.fit(RunFolder(folder))
    return losses, trainer


def epoch_records(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resume_mid_epoch_with_dropout_repeats_the_losses(cell, tmp_path):
    corpus = toy_corpus()
    config = small_config(model={"cell": cell, "dropout": 0.3}, train={"max_steps": 30})
    full, _ = run(config, corpus, tmp_path / "full")
    first, stopped = run(config, corpus, tmp_path / "split", stop_at=11)
    assert stopped.result.exit_status == 130 and len(first) == 11
    rest, resumed = run(config, corpus, tmp_path / "split", restore_from=tmp_path / "split" / "last.pt")
    assert resumed.global_step == 30
    assert first + rest == pytest.approx(full, rel=1e-6, abs=0)


def test_resume_across_epochs_keeps_the_lr_schedule(tmp_path):
    corpus = toy_corpus(lines=(150, 40, 40))  # a few batches per epoch, so the run crosses several epochs
    config = small_config(model={"dropout": 0.2}, train={"epochs": 5, "lr": 40.0})
    full, _ = run(config, corpus, tmp_path / "full")
    annealed = [r for r in epoch_records(tmp_path / "full") if not r["best"]]
    assert annealed, "the reference run should anneal its lr at least once for this test to mean something"
    per_epoch = len(full) // 5
    stop_at = per_epoch + per_epoch // 2  # the middle of epoch 2
    first, _ = run(config, corpus, tmp_path / "split", stop_at=stop_at)
    rest, resumed = run(config, corpus, tmp_path / "split", restore_from=tmp_path / "split" / "last.pt")
    assert first + rest == pytest.approx(full, rel=1e-6, abs=0)
    full_epochs, split_epochs = epoch_records(tmp_path / "full"), epoch_records(tmp_path / "split")
    assert [r["lr_next"] for r in split_epochs] == [r["lr_next"] for r in full_epochs]
    assert [r["val_loss"] for r in split_epochs] == pytest.approx([r["val_loss"] for r in full_epochs], rel=1e-6)


def test_stop_during_validation_resumes_with_validation(tmp_path):
    """A stop that lands after the epoch's last batch leaves validation pending; resume does it first."""
    corpus = toy_corpus(lines=(150, 40, 40))
    config = small_config(train={"epochs": 2})
    full, _ = run(config, corpus, tmp_path / "full")
    per_epoch = len(full) // 2
    first, _ = run(config, corpus, tmp_path / "split", stop_at=per_epoch)
    payload = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (payload["epoch"], payload["batches_done"]) == (1, per_epoch)
    rest, _ = run(config, corpus, tmp_path / "split", restore_from=tmp_path / "split" / "last.pt")
    assert first + rest == pytest.approx(full, rel=1e-6, abs=0)
    assert len(epoch_records(tmp_path / "split")) == 2


def test_nan_in_a_weight_stops_with_the_last_good_state(tmp_path):
    corpus = toy_corpus()
    config = small_config(train={"max_steps": 40, "log_interval": 5})

    def poison(trainer, step):
        if step == 12:
            with torch.no_grad():
                trainer.model.decoder.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged) as caught:
        run(config, corpus, tmp_path / "run", on_step=poison)
    message = str(caught.value)
    assert "step 13" in message and "\n" not in message  # the first step whose loss saw the NaN
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["step"] == 10  # the last log window that was still finite
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_resume_refuses_changed_model_flags(tmp_path):
    corpus = toy_corpus()
    config = small_config(train={"max_steps": 3})
    run(config, corpus, tmp_path / "run")
    with pytest.raises(FastlmError, match=r"--nhid 64 differs .* trained with 32"):
        resume_config(tmp_path / "run", {"model": {"nhid": 64}})
    allowed, _, changed = resume_config(tmp_path / "run", {"train": {"epochs": 3}})
    assert changed == {"epochs": [1, 3]}
    assert allowed.train.epochs == 3


def test_resume_refuses_other_data(tmp_path):
    config = small_config(train={"max_steps": 3})
    run(config, toy_corpus(seed=0), tmp_path / "run")
    trainer = Trainer(config, toy_corpus(seed=1, words=150), torch.device("cpu"), quiet_display())
    with pytest.raises(FastlmError, match="another vocabulary"):
        trainer.restore(load_checkpoint(tmp_path / "run" / "last.pt"), "last.pt")


def test_no_best_yet_is_reported(tmp_path):
    corpus = toy_corpus()
    config = small_config(train={"max_steps": 30})
    _, trainer = run(config, corpus, tmp_path / "run", stop_at=2)
    assert trainer.result.test_loss is None and not (tmp_path / "run" / "best.pt").exists()
    assert math.isfinite(load_checkpoint(tmp_path / "run" / "last.pt")["lr"])


def poisoned_run(folder, skip_nonfinite, bad_steps, poison_gradients=False):
    """A run whose steps in ``bad_steps`` get a NaN loss (or, with ``poison_gradients``, a finite loss with
    NaN gradients). Returns (trainer, {step: (loss, parameters, hidden state) after it}, log records)."""
    config = small_config(train={"max_steps": 20, "log_interval": 5, "skip_nonfinite": skip_nonfinite})
    after = {}
    trainer = None

    def snapshot(step, loss):
        after[step] = (loss.item(), [p.detach().clone() for p in trainer.model.parameters()],
                       [s.clone() for s in trainer.state])

    trainer = Trainer(config, toy_corpus(), torch.device("cpu"), quiet_display(), on_step=snapshot)
    clean_loss, calls = trainer.model.loss, []

    def loss(hidden, targets, *precision):  # the step passes the decoder's compute dtype
        value = clean_loss(hidden, targets, *precision)
        if trainer.model.training:
            calls.append(None)
            if len(calls) in bad_steps:
                if poison_gradients:
                    value.register_hook(lambda grad: grad * float("nan"))
                else:
                    value = value * float("nan")
        return value

    trainer.model.loss = loss
    try:
        trainer.result = trainer.fit(RunFolder(folder))
    finally:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    return trainer, after, [r for r in map(json.loads, lines) if r["kind"] == "log"]


@pytest.mark.parametrize("poison_gradients", [False, True], ids=["nan-loss", "nan-gradients"])
def test_skip_nonfinite_skips_bad_batches_and_records_them(tmp_path, poison_gradients):
    bad = {7, 8, 12}
    trainer, after, logs = poisoned_run(tmp_path / "run", 3, bad, poison_gradients)
    # The budget pauses the run at step 20 with a finite validation of the weights the skips left.
    assert trainer.global_step == 20 and math.isfinite(trainer.result.pause["val_loss"])
    for step in bad:  # a skipped step changes neither the weights nor the carried hidden state
        _, weights, state = after[step]
        _, weights_before, state_before = after[step - 1]
        assert all(torch.equal(a, b) for a, b in zip(weights_before + state_before, weights + state, strict=True))
    assert not torch.equal(after[9][1][0], after[8][1][0])  # training goes on after them
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [(r["step"], r["skipped"], r["first_skipped_step"], r["skipped_total"]) for r in logs] == [
        (5, 0, None, 0), (10, 2, 7, 2), (15, 1, 12, 3), (20, 0, None, 3)]
    for record in logs:  # each window's loss is the mean over its good batches only
        good = [after[s][0] for s in range(record["step"] - 4, record["step"] + 1) if s not in bad]
        assert record["loss"] == pytest.approx(sum(good) / len(good), rel=1e-6)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["skipped_batches"] == 3


def test_a_window_of_only_skipped_batches_logs_no_loss(tmp_path):
    trainer, _, logs = poisoned_run(tmp_path / "run", 5, {6, 7, 8, 9, 10})
    assert trainer.global_step == 20
    assert (logs[1]["step"], logs[1]["skipped"], logs[1]["loss"], logs[1]["ppl"]) == (10, 5, None, None)
    assert all(math.isfinite(r["loss"]) for r in logs if r["step"] != 10)


def test_more_bad_batches_than_allowed_stop_the_run(tmp_path):
    with pytest.raises(TrainingDiverged) as caught:
        poisoned_run(tmp_path / "run", 1, {7, 8})
    message = str(caught.value)
    assert "2 batches" in message and "--skip-nonfinite 1" in message and "step 7" in message
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5


def test_nan_gradients_with_a_finite_loss_stop_the_run_without_skipping(tmp_path):
    with pytest.raises(TrainingDiverged, match="non-finite at step 7"):
        poisoned_run(tmp_path / "run", 0, {7}, poison_gradients=True)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_hidden_state_is_saved_in_its_own_shape_and_older_lists_still_load(cell):
    h = torch.randn(2, 3, 4)
    state = (h, h + 1) if cell == "lstm" else h
    saved = hidden_to_save(state)
    assert type(saved) is type(state)
    older = list(state) if cell == "lstm" else [state]  # how checkpoints held it before
    for form in (saved, older):
        restored = hidden_from_saved(form, torch.device("cpu"), cell)
        assert type(restored) is type(state)
        assert all(torch.equal(a, b) for a, b in zip(restored if cell == "lstm" else [restored],
                                                     state if cell == "lstm" else [state], strict=True))
