"""The semantic anchor: fastlm's trainer computes the PyTorch word_language_model recipe's numbers.

The whole recipe, against an independent loop (tests/example_recipe.py, written from docs/semantics.md without
fastlm's code): several epochs on a generated corpus with structure to learn, dropout 0.2 on the embedding
output, between the two layers and on the recurrent output, the loss in several chunks (a ragged last one)
and a short last batch per epoch. Compared: every training step's loss, every epoch's validation loss,
which epochs improved (the best-model choice), the lr after each epoch (keep, else /4) and the best
model's test loss.

Two recipes, chosen so that each piece of the schedule shows in the numbers (the guard test checks it):
- "lstm": untied, lr 10, 7 epochs; the last epoch does not improve, so the test loss is the best model's
  (epoch 6), not the last one's.
- "gru": tied weights, lr 5, 5 epochs; epoch 3 does not improve, so epochs 4-5 train at lr 1.25.
Every backend runs both on the full corpus, except those run by an interpreter on CPU (triton), which run
a short version (2 epochs of a small corpus) to stay fast.

Tolerance, measured on the 2-core CPU (torch 2.13): the largest relative difference of any step loss from
the independent loop is 2.4e-7, of any validation or test loss 7.4e-8, for cudnn, reference, script, compile
and (short) triton alike: summation-order noise at the ulp level that these trajectories do not amplify.
Not every trajectory is that calm (at lr 20, or with other lr, sizes and seeds, some part by 1e-3 within a
hundred steps), so the recipes' settings are part of the anchor. TOLERANCE = 1e-5 leaves 40x for other
machines. The smallest semantic change tried, clip 0.25 -> 0.251, moves the numbers by 5.6e-4 (lstm) and
2.2e-3 (gru), 56x the tolerance; clip 0.26 moves lstm's by 5.1e-3 and changes gru's schedule, and another
seed changes both schedules (test_anchor_detects_a_semantic_change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from fastlm import cells
from fastlm.data.synthetic import generated_corpus
from fastlm.model import Chunking
from fastlm.train import RunFolder, Trainer, TrainingDiverged
from tests.example_recipe import RecipeRun, run_recipe
from tests.helpers import backend_param, quiet_display, small_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5
DETECTABLE = 10 * TOLERANCE  # what the smallest semantic change must clear (it clears 60x; see the module doc)
CHUNKING = Chunking(tokens=40, vocab_block=64)  # 96-token batches: chunks of 40, 40 and 16
FULL = {"train": 1600, "valid": 1000, "test": 1000}  # 17 batches per epoch, the last one 7 rows of 12
SHORT = {"train": 400, "valid": 200, "test": 200}  # 5 batches per epoch, the last one 5 rows of 12
INTERPRETED_ON_CPU = {"triton"}


@dataclass(frozen=True)
class Recipe:
    cell: str
    tied: bool
    lr: float
    epochs: int


RECIPES = {  # keyed by cell
    "lstm": Recipe("lstm", tied=False, lr=10.0, epochs=7),
    "gru": Recipe("gru", tied=True, lr=5.0, epochs=5),
}


def recipe_config(name: str, backend: str = "cudnn", short: bool = False, **train):
    recipe = RECIPES[name]
    # On CUDA: eager steps, whose dropout masks are drawn as the independent loop draws them (a replayed
    # CUDA graph draws its own); graphs are held to the eager step by test_fast_step.py.
    return small_config(model={"cell": recipe.cell, "backend": backend, "tied": recipe.tied, "dropout": 0.2},
                        train={"lr": recipe.lr, "epochs": 2 if short else recipe.epochs, "clip": 0.25,
                               "log_interval": 1000, "device": DEVICE, "cuda_graphs": False, **train})


_corpora: dict = {}
_recipe_runs: dict = {}


def corpus_for(short: bool):
    key = "short" if short else "full"
    if key not in _corpora:
        _corpora[key] = generated_corpus(sizes=SHORT if short else FULL)
    return _corpora[key]


def independent_run(name: str, short: bool, layerwise: bool) -> RecipeRun:
    """The independent loop's run of a recipe, computed once per session and shared by every backend."""
    key = (name, short, layerwise)
    if key not in _recipe_runs:
        _recipe_runs[key] = run_recipe(corpus_for(short), recipe_config(name, short=short), DEVICE, layerwise)
    return _recipe_runs[key]


def fastlm_run(config, corpus, run_dir) -> RecipeRun:
    """fastlm's trainer on the recipe: losses from its step hook, the rest from its metrics.jsonl."""
    run = RecipeRun()
    trainer = Trainer(config, corpus, torch.device(DEVICE), quiet_display(),
                      on_step=lambda step, loss: run.step_losses.append(loss.item()))
    trainer.model.loss_chunking = CHUNKING
    try:
        trainer.fit(RunFolder(run_dir))
    except TrainingDiverged as diverged:  # the independent loop's numbers are finite: a wrong number
        pytest.fail(f"fastlm's numbers became non-finite where the example's stay finite: {diverged}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    run.val_losses = [r["val_loss"] for r in epochs]
    run.improved = [r["best"] for r in epochs]
    run.lr_after_epoch = [r["lr_next"] for r in epochs]
    run.test_loss = next(r["test_loss"] for r in records if r["kind"] == "test")
    return run


def differences(got: RecipeRun, want: RecipeRun) -> dict:
    """The largest relative difference of each kind of number; schedules must agree exactly."""
    assert len(got.step_losses) == len(want.step_losses), "a different number of training steps"
    assert got.improved == want.improved, f"best-model choice: {got.improved} instead of {want.improved}"
    assert got.lr_after_epoch == want.lr_after_epoch, \
        f"lr schedule: {got.lr_after_epoch} instead of {want.lr_after_epoch}"

    def rel(a, b):
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        return ((a - b).abs() / b.abs()).max().item()

    return {"steps": rel(got.step_losses, want.step_losses), "valid": rel(got.val_losses, want.val_losses),
            "test": rel([got.test_loss], [want.test_loss])}


def _cases():
    """Every registered backend, each recipe (named after its cell); SKIPPED with the reason where it cannot run."""
    for cell, backend in cells.registered():
        if cell in RECIPES:
            short = DEVICE == "cpu" and backend in INTERPRETED_ON_CPU
            yield backend_param(cell, backend, short, marks=[pytest.mark.slow] if short else [],
                                id=f"{cell}-{backend}{'-short' if short else ''}")


@pytest.mark.parametrize("name, backend, short", list(_cases()))
def test_trainer_computes_the_recipes_numbers(name, backend, short, tmp_path):
    # cuDNN draws its inter-layer dropout masks from a state of its own; the other backends use F.dropout.
    want = independent_run(name, short, layerwise=DEVICE == "cuda" and backend != "cudnn")
    got = fastlm_run(recipe_config(name, backend, short), corpus_for(short), tmp_path / "run")
    bad = {kind: f"{value:.2e}" for kind, value in differences(got, want).items() if not value <= TOLERANCE}
    assert not bad, f"relative differences from the example's recipe above {TOLERANCE:g}: {bad}"


def test_recipes_exercise_the_whole_schedule():
    """Guard: the recipes keep showing what the anchor relies on, whatever the corpus or defaults become."""
    lstm, gru = independent_run("lstm", False, False), independent_run("gru", False, False)
    # Something is learned (the corpus has structure): validation ends well below its first value.
    for run in (lstm, gru):
        assert min(run.val_losses) < run.val_losses[0] - 0.5, run.val_losses
    # The last epoch does not improve, so the best model is not the last one.
    assert lstm.improved == [True] * 6 + [False], lstm.improved
    # A non-improving epoch followed by epochs that train at the reduced lr.
    assert gru.improved == [True, True, False, True, True] and gru.lr_after_epoch[2:] == [1.25] * 3
    # Each epoch ends with a short batch: 199 target rows are 16 batches of 12 and one of 7.
    assert corpus_for(False).train.numel() // 8 - 1 == 16 * 12 + 7
    assert len(lstm.step_losses) == 7 * 17 and len(gru.step_losses) == 5 * 17


@pytest.mark.skipif(DEVICE != "cpu", reason="on CPU torch.nn draws inter-layer dropout like F.dropout per layer")
def test_layerwise_loop_is_torch_nn_on_cpu():
    """The layerwise oracle used for non-cuDNN backends on CUDA is torch.nn's stacked module, draw for draw."""
    stacked, layerwise = independent_run("lstm", True, False), independent_run("lstm", True, True)
    assert stacked == layerwise


@pytest.mark.parametrize("name, change", [
    ("lstm", {"clip": 0.251}),
    ("gru", {"clip": 0.251}),
    ("lstm", {"seed": 1112}),
])
def test_anchor_detects_a_semantic_change(name, change, tmp_path):
    """The comparison has teeth: a small change of the recipe moves the numbers far past the tolerance."""
    want = independent_run(name, False, layerwise=False)
    got = fastlm_run(recipe_config(name, "cudnn", **change), corpus_for(False), tmp_path / "run")
    try:
        moved = max(differences(got, want).values())
    except AssertionError:  # the schedule itself changed: detected
        return
    assert moved >= DETECTABLE, f"{change} moved the numbers by only {moved:.2e}"
