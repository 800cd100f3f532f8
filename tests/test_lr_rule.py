"""--lr-rule: the example's rule anneals whenever validation does not improve; the noise rule only when
validation is worse than the best by more than its measured noise (the standard error over the batches
evaluated), so a short run whose validation only wobbles keeps its lr."""

import json
import math
import statistics

import pytest
import torch

from fastlm.train.lr_rule import anneals, validation_noise
from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer
from tests.helpers import quiet_display, small_config, toy_corpus

CORPUS = toy_corpus(lines=(150, 40, 40))  # 15 training batches, 8 validation batches at the small config


def epoch_records(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def scripted_trainer(rule: str, val_losses: list, noise: float) -> Trainer:
    """A trainer whose validations return ``val_losses`` in turn with the noise ``noise`` (training and the
    final test are real)."""
    config = small_config(train={"lr_rule": rule, "epochs": len(val_losses), "steps_per_epoch": 2,
                                 "eval_batches": 2})
    trainer = Trainer(config, CORPUS, torch.device("cpu"), quiet_display())
    real, script = trainer.evaluate, list(val_losses)

    def evaluate(stream, split, interruptible=True, batches=None):
        if split != "valid":
            return real(stream, split, interruptible, batches)
        trainer.last_eval_noise = noise
        return script.pop(0)

    trainer.evaluate = evaluate
    return trainer


WOBBLE = [5.00, 5.03, 4.98, 5.02, 5.01]  # changes of at most 0.05 nats, all within a noise of 0.06


def test_a_run_whose_validation_only_wobbles_within_its_noise_keeps_its_lr(tmp_path):
    scripted_trainer("noise", WOBBLE, noise=0.06).fit(RunFolder(tmp_path / "run"))
    epochs = epoch_records(tmp_path / "run")
    assert [e["lr_next"] for e in epochs] == [20.0] * len(WOBBLE)
    assert [e["val_noise"] for e in epochs] == [0.06] * len(WOBBLE)
    assert [e["best"] for e in epochs] == [True, False, True, False, False]  # the best model is still kept


def test_the_example_rule_anneals_on_the_same_wobble(tmp_path):
    scripted_trainer("example", WOBBLE, noise=0.06).fit(RunFolder(tmp_path / "run"))
    assert [e["lr_next"] for e in epoch_records(tmp_path / "run")] == [20.0, 5.0, 5.0, 1.25, 0.3125]


def test_a_rise_beyond_the_noise_anneals(tmp_path):
    scripted_trainer("noise", [5.0, 5.2, 5.04, 5.3], noise=0.06).fit(RunFolder(tmp_path / "run"))
    assert [e["lr_next"] for e in epoch_records(tmp_path / "run")] == [20.0, 5.0, 5.0, 1.25]


def test_noise_final_also_quarters_the_lr_before_the_last_epoch_and_only_then(tmp_path):
    scripted_trainer("noise-final", WOBBLE, noise=0.06).fit(RunFolder(tmp_path / "run"))
    assert [e["lr_next"] for e in epoch_records(tmp_path / "run")] == [20.0, 20.0, 20.0, 5.0, 5.0]


@pytest.mark.parametrize("val_loss, best, noise, rule, expected", [
    (5.05, 5.0, 0.06, "noise", False),
    (5.07, 5.0, 0.06, "noise", True),
    (5.01, 5.0, None, "noise", True),  # no noise measured (one batch): any rise anneals
    (5.00, 5.0, 0.06, "example", True),  # the example: not better is enough
    (4.99, 5.0, 0.06, "example", False),
    (9.00, None, 0.06, "noise", False),  # the first epoch has nothing to be worse than
    (5.07, 5.0, 0.06, "noise-final", True),  # the noise rule still holds
    (5.05, 5.0, 0.06, "noise-final", False),
])
def test_the_rules(val_loss, best, noise, rule, expected):
    assert anneals(rule, val_loss, best, noise) is expected


def test_the_noise_is_the_standard_error_of_the_batch_losses():
    losses, tokens = [4.1, 5.3, 4.7, 6.0, 5.2], 350
    noise = validation_noise(sum(l * tokens for l in losses), sum(l * l * tokens for l in losses),
                             tokens * len(losses), len(losses))
    assert noise == pytest.approx(statistics.stdev(losses) / math.sqrt(len(losses)), rel=1e-12)
    assert validation_noise(4.0 * tokens, 16.0 * tokens, tokens, 1) is None


def test_evaluation_measures_its_noise_from_its_own_batches():
    """The trainer's noise against per-batch losses recovered from evaluations of the first k batches."""
    trainer = Trainer(small_config(), CORPUS, torch.device("cpu"), quiet_display())
    n = 6  # of the 8 validation batches: all of the same length
    means = [trainer.evaluate(trainer.valid_stream, "valid", batches=k) for k in range(1, n + 1)]
    batch_losses = [k * means[k - 1] - (k - 1) * means[k - 2] if k > 1 else means[0] for k in range(1, n + 1)]
    trainer.evaluate(trainer.valid_stream, "valid", batches=n)
    assert trainer.last_eval_noise == pytest.approx(statistics.stdev(batch_losses) / math.sqrt(n), rel=1e-6)
    assert trainer.last_eval_noise > 0
