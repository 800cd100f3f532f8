"""What a study at small scale needs from `fastlm train`: short epochs, quick evaluation, thread control, a
warning when the machine is too busy to time, train and evaluation seconds apart, and parameter counts."""

import json

import pytest
import torch

import fastlm.train.trainer
from fastlm.config import ModelConfig
from fastlm.device import SWEEP_THREADS
from fastlm.model import RNNLM
from fastlm.train.checkpoint import load_checkpoint
from fastlm.train.command import resume_config
from fastlm.train.run_folder import RunFolder
from fastlm.train.sizing import parameter_count
from fastlm.train.trainer import Trainer, TrainingDiverged
from tests.helpers import quiet_display, run_cli, small_config, toy_corpus, write_corpus_folder

CORPUS = toy_corpus(lines=(150, 40, 40))  # 15 training batches, 8 validation batches at the small config


def records(folder, kind):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def recording_trainer(config):
    """A trainer that notes the training batch indices it takes and whether each step got a fresh state."""
    trainer = Trainer(config, CORPUS, torch.device("cpu"), quiet_display())
    taken, fresh = [], []
    iterate, eager = trainer.train_stream.iterate, trainer.step_fn.eager

    def noting_iterate(start=0, count=None):
        for index, inputs, targets in iterate(start, count):
            taken.append(index)
            yield index, inputs, targets

    def noting_eager(inputs, targets, state, timer):
        fresh.append(all(torch.count_nonzero(s) == 0 for s in state))
        return eager(inputs, targets, state, timer)

    trainer.train_stream.iterate, trainer.step_fn.eager = noting_iterate, noting_eager
    return trainer, taken, fresh


def test_steps_per_epoch_go_on_through_the_corpus(tmp_path):
    config = small_config(train={"epochs": 3, "steps_per_epoch": 7})
    trainer, taken, fresh = recording_trainer(config)
    trainer.fit(RunFolder(tmp_path / "run"))
    assert taken == [0, 1, 2, 3, 4, 5, 6] + [7, 8, 9, 10, 11, 12, 13] + [14, 0, 1, 2, 3, 4, 5]
    # A fresh hidden state at the corpus's start only: epoch 2 carries epoch 1's state into batch 7.
    assert [i for i, f in enumerate(fresh) if f] == [0, 15]
    assert [r["step"] for r in records(tmp_path / "run", "epoch")] == [7, 14, 21]


def test_a_run_with_short_epochs_resumes_step_for_step(tmp_path):
    config = small_config(model={"dropout": 0.2}, train={"epochs": 3, "steps_per_epoch": 7, "lr": 40.0})
    whole = Trainer(config, CORPUS, torch.device("cpu"), quiet_display())
    whole.fit(RunFolder(tmp_path / "whole"))
    first = small_config(model={"dropout": 0.2}, train={"epochs": 3, "steps_per_epoch": 7, "lr": 40.0,
                                                        "max_steps": 10})
    Trainer(first, CORPUS, torch.device("cpu"), quiet_display()).fit(RunFolder(tmp_path / "split"))
    resumed_config, payload, _ = resume_config(tmp_path / "split", {})
    resumed = Trainer(resumed_config, CORPUS, torch.device("cpu"), quiet_display())
    resumed.restore(payload, tmp_path / "split" / "last.pt")
    resumed.fit(RunFolder(tmp_path / "split"))
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert ([r["val_loss"] for r in records(tmp_path / "split", "epoch")]
            == [r["val_loss"] for r in records(tmp_path / "whole", "epoch")])


def test_eval_batches_evaluate_the_first_batches_only(tmp_path):
    trainer = Trainer(small_config(train={"eval_batches": 3}), CORPUS, torch.device("cpu"), quiet_display())
    full = Trainer(small_config(), CORPUS, torch.device("cpu"), quiet_display())
    full.model.load_state_dict(trainer.model.state_dict())
    # The first 3 batches of the validation split, by hand: eval batch 4, bptt 12 -> 36 rows and their targets.
    tokens = CORPUS.valid[: CORPUS.valid.numel() // 4 * 4].view(4, -1).t()[:37]
    short = Trainer(small_config(), type(CORPUS)(CORPUS.vocab, CORPUS.train, tokens.t().reshape(-1), CORPUS.test,
                                                 "first batches"), torch.device("cpu"), quiet_display())
    short.model.load_state_dict(trainer.model.state_dict())
    assert len(short.valid_stream) == 3
    quick = trainer.evaluate(trainer.valid_stream, "valid")
    assert quick == pytest.approx(short.evaluate(short.valid_stream, "valid"), rel=1e-12)
    assert quick != pytest.approx(full.evaluate(full.valid_stream, "valid"), rel=1e-6)


def test_epochs_record_training_and_evaluation_seconds_apart(tmp_path):
    Trainer(small_config(train={"epochs": 2}), CORPUS, torch.device("cpu"), quiet_display()).fit(
        RunFolder(tmp_path / "run"))
    for record in records(tmp_path / "run", "epoch"):
        assert record["train_seconds"] > 0 and record["eval_seconds"] > 0
        assert record["seconds"] == pytest.approx(record["train_seconds"] + record["eval_seconds"])


def test_a_paused_epoch_keeps_its_training_seconds(tmp_path):
    Trainer(small_config(train={"max_steps": 5}), CORPUS, torch.device("cpu"), quiet_display()).fit(
        RunFolder(tmp_path / "run"))
    before = load_checkpoint(tmp_path / "run" / "last.pt")["epoch_train_seconds"]
    config, payload, _ = resume_config(tmp_path / "run", {})
    resumed = Trainer(config, CORPUS, torch.device("cpu"), quiet_display())
    resumed.restore(payload, tmp_path / "run" / "last.pt")
    resumed.fit(RunFolder(tmp_path / "run"))
    epoch = records(tmp_path / "run", "epoch")[0]
    assert before > 0 and epoch["train_seconds"] > before


def test_a_busy_machine_marks_the_timings_unreliable(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # a run as large as the machine below
    monkeypatch.setattr(fastlm.train.trainer, "machine_load", lambda: (9.5, 2))
    display = quiet_display()
    Trainer(small_config(train={"max_steps": 6}), CORPUS, torch.device("cpu"), display).fit(
        RunFolder(tmp_path / "run"))
    logs = records(tmp_path / "run", "log")
    assert logs and all(r["timing_unreliable"] and (r["load"], r["cores"]) == (9.5, 2) for r in logs)
    assert display.console.file.getvalue().count("exceeds its 2 cores") == 1


def test_an_idle_machine_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(fastlm.train.trainer, "machine_load", lambda: (0.5, 2))
    Trainer(small_config(train={"max_steps": 6}), CORPUS, torch.device("cpu"), quiet_display()).fit(
        RunFolder(tmp_path / "run"))
    assert not any("timing_unreliable" in r for r in records(tmp_path / "run", "log"))


@pytest.mark.parametrize("load, beside, own", [(2.1, None, 2), (4.4, "2", 4)])
def test_the_runs_own_threads_are_not_taken_for_other_work(tmp_path, monkeypatch, load, beside, own):
    """A 2-thread run alone on an idle 2-core machine loads it to about 2 itself; in a sweep, the points beside it
    (their threads in FASTLM_SWEEP_THREADS) are the sweep's own work too. Neither makes the timings unreliable."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(fastlm.train.trainer, "machine_load", lambda: (load, 2))
    if beside is None:
        monkeypatch.delenv(SWEEP_THREADS, raising=False)
    else:
        monkeypatch.setenv(SWEEP_THREADS, beside)
    display = quiet_display()
    Trainer(small_config(train={"max_steps": 6}), CORPUS, torch.device("cpu"), display).fit(RunFolder(tmp_path / "run"))
    logs = records(tmp_path / "run", "log")
    assert logs and all("timing_unreliable" not in r and r["own_threads"] == own for r in logs), logs
    assert "exceeds its" not in display.console.file.getvalue()


@pytest.mark.parametrize("model", [ModelConfig(), ModelConfig(cell="gru", tied=True, nlayers=3),
                                   ModelConfig(cell="rnn_relu", emsize=30, nhid=50, nlayers=1)])
def test_parameter_counts_by_part_add_up_and_agree_with_the_sizing(model):
    counts = RNNLM(500, model).parameter_counts()
    assert counts["total"] == counts["embedding"] + counts["recurrent"] + counts["decoder"]
    assert counts["total"] == parameter_count(model, 500)
    assert counts["embedding"] == 500 * model.emsize
    assert counts["decoder"] == (500 if model.tied else 500 * model.nhid + 500)


def test_the_train_command_prints_and_keeps_the_counts_and_applies_threads(tmp_path):
    data = write_corpus_folder(CORPUS, tmp_path)
    threads = torch.get_num_threads()
    try:
        status, out, err = run_cli("train", "--data", data, "--device", "cpu", "--emsize", 16, "--nhid", 16,
                                   "--dry-run", "--threads", 1, "--run-dir", tmp_path / "run")
        assert status == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["threads"] == 1 and config["threads"] == 1
    counts = config["parameters"]
    assert f"parameters: {counts['total']:,}" in out and counts["recurrent"] == 2 * 4 * 16 * (16 + 16 + 2)


def test_a_divergence_is_recorded_in_the_metrics(tmp_path):
    def poison(trainer, step):
        if step == 4:
            with torch.no_grad():
                trainer.model.decoder.weight[0, 0] = float("nan")

    trainer = Trainer(small_config(train={"max_steps": 20}), CORPUS, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: poison(trainer, step))
    with pytest.raises(TrainingDiverged) as caught:
        trainer.fit(RunFolder(tmp_path / "run"))
    diverged = records(tmp_path / "run", "diverged")
    assert [(r["step"], r["message"]) for r in diverged] == [(5, str(caught.value))]


def test_state_reset_gives_the_losses_of_a_loop_that_zeroes_the_state_each_chunk(tmp_path):
    """--state reset against the independent recipe with every chunk started from zeros (training and
    evaluation), on the anchor's small generated corpus, dropout on; and a different run from carrying."""
    from fastlm.data.synthetic import generated_corpus
    from tests.example_recipe import run_recipe

    corpus = generated_corpus(sizes={"train": 800, "valid": 400, "test": 400})
    config = small_config(model={"dropout": 0.2}, train={"epochs": 3, "lr": 5.0, "state": "reset",
                                                        "log_interval": 1000})
    want = run_recipe(corpus, config, reset_state=True)
    losses = []
    trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: losses.append(loss.item()))
    trainer.fit(RunFolder(tmp_path / "run"))
    assert losses == pytest.approx(want.step_losses, rel=1e-5)
    epochs = records(tmp_path / "run", "epoch")
    assert [r["val_loss"] for r in epochs] == pytest.approx(want.val_losses, rel=1e-5)
    assert records(tmp_path / "run", "test")[0]["test_loss"] == pytest.approx(want.test_loss, rel=1e-5)
    carried = run_recipe(corpus, config, reset_state=False)
    assert abs(carried.val_losses[-1] - want.val_losses[-1]) > 1e-3  # the ablation changes the numbers
