"""The study presets: `fastlm sweep --quick` and `--standard`, LSTM against GRU on Wikitext-2.

Each is a one-factor-at-a-time design around a stated baseline, every point trained with several seeds, and
the settings every point shares. What each setting is for, and what chose it, is said in ``why`` (the report
prints it), so that a number in a report never stands without the choices behind it. Flags given with a preset
still override it. The precision is one setting (``settings["train"]["precision"]``): a faster precision that
keeps fp32's quality is a change of that one value.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastlm.sweep.grid import Grid

CELLS = ["lstm", "gru"]
# The three parameters of the homework's list (epochs, layers, hidden size, embedding size, BPTT length,
# non-linearity) each preset varies, two values each, the baseline the second.
AXES = {"nlayers": [1, 2], "nhid": [100, 200], "emsize": [100, 200]}
AXES_WHY = ("nlayers, nhid and emsize at two values each around a baseline of 2 layers, 200 hidden units and "
            "embeddings of 200 (the PyTorch example's model): depth, width and input size are where the cells' "
            "gating could behave differently, and every variation is smaller than the baseline, so none costs "
            "more than it. BPTT length is left out because at a fixed number of steps a shorter bptt also trains on "
            "fewer tokens (two effects in one number); epochs need no points of their own: every run records "
            "validation after each epoch, so the learning curves show them. The non-linearity is a cell of its "
            "own (--cells rnn_tanh,rnn_relu).")
# GRU's lr: a 150-step probe of the baseline (2 x 200, adaptive decoder, Wikitext-2, validation on 40 batches)
# gave validation perplexity 3,720 at lr 20 (GRU at lr 20 also rose between epochs in the earlier quick study)
# and 1,222 at lr 5, where LSTM at lr 20 gave 1,553. Over 1,000 steps (5 x 200, seed 1111, the noise rule, one
# thread) GRU ended at 526 with lr 5, 463 with lr 10 and 475 with lr 15: lr 10.
PER_CELL = {"gru": {"lr": 10.0}}
LR_WHY = ("lr 20 for LSTM (the example's) and 10 for GRU (probes of the baseline: after 150 steps GRU validation "
          "perplexity 3,720 at lr 20 and 1,222 at lr 5; after 1,000 steps 526 at lr 5, 463 at lr 10, 475 at lr 15), "
          "each with the noise rule: the lr is divided by 4 only when validation is worse than the best by more "
          "than its standard error")
# The standard study's sixth epoch under the noise rule alone: GRU with nhid 100 went 273 -> 291 (seed 1111) and
# 273 -> 280 (1112), still stepping at lr 10; resumed from each one's fifth epoch at lr 2.5, the sixth ended at
# 242 and 241. So the standard preset quarters the lr once more before its last epoch (--lr-rule noise-final).
FINAL_WHY = ("and the lr quartered once more before the last epoch (--lr-rule noise-final: under the noise rule "
             "alone GRU with nhid 100 rose from 273 to 291 and 280 in its sixth epoch at lr 10; resumed from its "
             "fifth epoch at lr 2.5 it reached 242 and 241)")
# Two points at once, one thread each: on the 2-core AMD EPYC (Zen 4) dev machine, the 2 x 200 LSTM step with the
# adaptive decoder took 51.8 ms alone at 2 threads and 84 ms in each of two 1-thread processes side by side
# (`fastlm bench --mode step --cell lstm --backend cudnn --decoder adaptive --threads 1|2`), 1.23x the points
# per hour.
JOBS_WHY = ("two points at a time with one thread each (1.23x the throughput of one 2-thread point on a 2-core "
            "CPU, measured); every point's training time is taken beside another point, so times compare")


@dataclass(frozen=True)
class Preset:
    name: str
    settings: dict  # {section: {field: value}} every point shares (under the flags)
    seeds: list[int]
    jobs: int  # points trained at once (each with a core's share of the threads)
    why: str

    def grid(self) -> Grid:
        return Grid(list(CELLS), {name: list(values) for name, values in AXES.items()},
                    {cell: dict(values) for cell, values in PER_CELL.items()}, "ofat", list(self.seeds))

    def describe(self) -> dict:
        """What sweep.json records of the preset (the report prints it)."""
        return {"name": self.name, "why": self.why, "axes_why": AXES_WHY}


def _settings(epochs: int, steps_per_epoch: int, eval_batches: int, log_interval: int, lr_rule: str) -> dict:
    """Both presets: the adaptive softmax decoder for both cells (the full vocabulary's decoder is most of a CPU
    step), an lr rule fit for short epochs (fastlm.train.lr_rule), short epochs validated on a fixed subset, fp32 (the one precision setting: a
    faster one that keeps fp32's quality is a change of this value)."""
    return {"model": {"decoder": "adaptive"},
            "train": {"lr_rule": lr_rule, "precision": "fp32", "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                      "eval_batches": eval_batches, "log_interval": log_interval}}


QUICK = Preset(
    name="quick",
    settings=_settings(epochs=5, steps_per_epoch=280, eval_batches=40, log_interval=70, lr_rule="noise"),
    seeds=[1111, 1112],
    jobs=2,
    why=f"5 epochs of 280 batches (1,400 steps: with 1,000, GRU at lr 5 ended near 530 and LSTM with emsize 100 "
        f"near 463), validated and tested on the first 40 batches of each split; the adaptive softmax decoder for both cells; {LR_WHY}; 2 seeds per point; fp32; {JOBS_WHY}.")

STANDARD = Preset(
    name="standard",
    settings=_settings(epochs=6, steps_per_epoch=1000, eval_batches=100, log_interval=200,
                       lr_rule="noise-final"),
    seeds=[1111, 1112],
    jobs=2,
    why=f"6 epochs of 1,000 batches (6,000 steps, about 2 passes over Wikitext-2's training split), validated "
        f"and tested on the first 100 batches of each split; the adaptive softmax decoder for both cells; "
        f"{LR_WHY}, {FINAL_WHY}; 2 seeds per point; fp32; {JOBS_WHY}.")

PRESETS = {preset.name: preset for preset in (QUICK, STANDARD)}
