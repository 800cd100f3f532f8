"""The LSTM-vs-GRU study: seeds as replicates (mean, spread, and whether a difference between the cells is beyond
the seeds' spread), flagged runs, one-factor-at-a-time points around a baseline, findings in words, portable
report paths and plots of a few lines a panel. The report runs on a sweep folder written by hand
(tests/study_fakes.py), so every expected number is known."""

import json
import math
import statistics

import pytest

from fastlm.config import RunConfig
from fastlm.errors import FastlmError
from fastlm.report.command import run_report
from fastlm.report.replicates import compare, spread, verdict
from fastlm.sweep.grid import Grid, add_setting, parse_seeds, points
from tests.study_fakes import write_study

BASE, NARROW, SHALLOW = (("nlayers", 2), ("nhid", 200)), (("nlayers", 2), ("nhid", 100)), (("nlayers", 1), ("nhid", 200))
QUIET, WOBBLE = {}, {"val_noise": 0.05}
SPIKE = {"losses": [7.0, 6.5, 6.0, 6.9, 5.8, 5.7]}  # +0.9 nats over the lowest before it: more than doubled
RESULTS = {
    # At the baseline GRU is lower by 34 with seeds far apart: beyond seed noise.
    ("lstm", BASE): [(1, [900, 600, 400], [10, 10, 10], QUIET), (2, [900, 620, 410], [11, 11, 11], QUIET)],
    ("gru", BASE): [(1, [900, 500, 370], [12, 12, 12], QUIET), (2, [900, 520, 372], [13, 13, 13], QUIET)],
    # One layer: the cells' seeds overlap: within seed noise. LSTM seed 1's rise of 0.4% is inside its noise.
    ("lstm", SHALLOW): [(1, [900, 450, 452], [5, 5, 5], WOBBLE), (2, [900, 500, 470], [5, 5, 5], QUIET)],
    ("gru", SHALLOW): [(1, [900, 460, 455], [6, 6, 6], QUIET), (2, [900, 465, 466], [6, 6, 6], QUIET)],
    # nhid 100: GRU seed 2 rises from 480 to 700 at epoch 3 (noise 1%); LSTM seed 2's training loss spikes.
    ("lstm", NARROW): [(1, [900, 700, 500], [4, 4, 4], QUIET), (2, [900, 700, 505], [4, 4, 4], SPIKE)],
    ("gru", NARROW): [(1, [900, 490, 485], [4, 4, 4], QUIET), (2, [900, 480, 700], [4, 4, 4], QUIET)],
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    folder = write_study(root / "sweep", RESULTS, {"nlayers": 2, "nhid": 200})
    report = run_report([folder], root / "report")
    return {"root": root, "folder": folder, "out": root / "report", "report": report,
            "markdown": (root / "report" / "report.md").read_text()}


def group(report, settings, cell):
    return next(g for g in report["groups"] if g["settings"] == dict(settings))["cells"][cell]


def comparison(report, settings):
    return next(g for g in report["groups"] if g["settings"] == dict(settings))["comparisons"][0]


# ------------------------------------------------------------------------------------------- the statistics

def test_a_point_s_spread_over_its_seeds():
    values = [400.0, 410.0, 431.0]
    assert spread(values) == {"n": 3, "mean": statistics.fmean(values), "std": statistics.stdev(values),
                              "min": 400.0, "max": 431.0}
    assert spread([400.0, None, float("nan")]) == {"n": 1, "mean": 400.0, "std": 0.0, "min": 400.0, "max": 400.0}
    assert spread([None]) is None


def test_a_difference_beyond_seed_noise_needs_twice_its_standard_error_and_ranges_apart():
    lstm, gru = spread([400.0, 410.0]), spread([370.0, 372.0])
    result = compare(lstm, gru)
    assert result["difference"] == pytest.approx(-34.0)
    assert result["error"] == pytest.approx(math.sqrt(50.0 / 2 + 2.0 / 2))
    assert result["beyond"] is True
    assert verdict(result, "GRU", ("lower", "higher")) == "GRU lower by 34 +- 5 (beyond seed noise)"
    # Ranges apart, but the difference (20.5) is under twice its standard error (2 x 19.0): within.
    assert compare(spread([100.0, 101.0]), spread([102.0, 140.0]))["beyond"] is False
    # Twice the standard error, but the ranges overlap: within.
    overlapping = compare(spread([100.0, 130.0, 131.0, 132.0]), spread([129.0, 160.0, 161.0, 162.0]))
    assert overlapping["difference"] > 2 * overlapping["error"] and overlapping["beyond"] is False
    assert verdict(overlapping, "GRU", ("lower", "higher")).endswith("(within seed noise)")
    one_seed = compare(spread([400.0]), spread([300.0]))
    assert one_seed["beyond"] is None and "one seed" in verdict(one_seed, "GRU", ("lower", "higher"))


# ------------------------------------------------------------------------------------------- the report

def test_each_point_s_seeds_become_a_mean_and_spread(study):
    lstm = group(study["report"], BASE, "lstm")
    assert lstm["seeds"] == [1, 2] and lstm["best_val_ppl"] == spread([400.0, 410.0])
    assert lstm["train_seconds"] == spread([30.0, 33.0])
    assert [s["mean"] for s in lstm["curve"]] == [900.0, 610.0, 405.0]
    assert "405.0 +- 7.1 (400.0-410.0)" in study["markdown"]


def test_every_lstm_gru_comparison_has_its_verdict_in_words(study):
    report, markdown = study["report"], study["markdown"]
    assert comparison(report, BASE)["val_ppl"]["beyond"] is True
    assert comparison(report, SHALLOW)["val_ppl"]["beyond"] is False
    summary = " ".join(report["findings"]["summary"])
    assert "At the baseline (nlayers 2, nhid 200)" in summary
    assert "GRU lower by 34 +- 5 (beyond seed noise)" in summary
    nlayers = " ".join(report["findings"]["fields"]["nlayers"])
    assert "At nlayers 1:" in nlayers and "within seed noise" in nlayers
    assert "GRU lower by 34 +- 5 (beyond seed noise)" in markdown
    assert "fastlm sweep --quick --out study" in markdown  # the command that reproduces it, at the top
    assert markdown.index("## Summary") < markdown.index("## Findings") < markdown.index("## Conditions")


def test_a_rising_point_and_a_loss_spike_are_flagged_and_a_wobble_is_not(study):
    runs = {run["name"]: run for run in study["report"]["runs"]}
    rising = runs["gru-nlayers2-nhid100-seed2"]["flags"]
    assert rising == ["validation perplexity rose at epoch 3 (480.0 -> 700.0)"]
    assert runs["lstm-nlayers2-nhid100-seed2"]["flags"][0].startswith("training loss spiked at step 40")
    assert runs["lstm-nlayers1-nhid200-seed1"]["flags"] == []  # 450 -> 452 is inside its 5% noise
    assert sum(bool(run["flags"]) for run in runs.values()) == 2
    assert group(study["report"], NARROW, "gru")["flagged"] == ["gru-nlayers2-nhid100-seed2"]
    flagged = study["markdown"].split("## Flagged runs")[1].split("##")[0]
    assert "gru-nlayers2-nhid100-seed2" in flagged and "rose at epoch 3" in flagged
    assert "2 run(s) flagged" in " ".join(study["report"]["findings"]["summary"])


def test_the_field_tables_read_one_factor_at_a_time(study):
    rows = {row["value"]: row["cells"]["lstm"] for row in study["report"]["tables"]["fields"]["nlayers"]}
    # nlayers 2 over the runs at the baseline nhid 200 only: 2 seeds, not the 4 that nhid 100 would add.
    assert rows[2]["n"] == 2 and rows[2]["best_val_ppl"] == pytest.approx(405.0)
    assert rows[1]["n"] == 2 and rows[1]["best_val_ppl"] == pytest.approx(460.0)


def test_the_runs_list_names_what_is_needed_to_check_every_number(study):
    saved = json.loads((study["out"] / "report.json").read_text())
    assert len(saved["runs"]) == 12
    for run in saved["runs"]:
        assert {"cell", "settings", "seed", "status", "epochs"} <= run.keys() and run["status"] == "done"
        assert all({"val_ppl", "train_seconds"} <= epoch.keys() for epoch in run["epochs"])
        assert (study["out"] / run["run_dir"] / "metrics.jsonl").is_file()  # relative to the report


def test_the_report_names_no_machine_path(study):
    text = (study["out"] / "report.json").read_text() + study["markdown"]
    assert str(study["root"]) not in text and "/somewhere" not in text
    assert study["report"]["sources"] == ["../sweep"]
    assert "FASTLM_WIKITEXT2=wikitext-2" in text


def test_plots_hold_a_few_lines_a_panel(study):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.report.plots import figure

    assert study["report"]["plots"] == ["plots/nlayers.png", "plots/nlayers.svg", "plots/nhid.png",
                                        "plots/nhid.svg"]
    for field in ("nlayers", "nhid"):
        fig = figure(plt, study["report"], field)
        assert len(fig.axes) == 4
        assert all(1 <= len(ax.lines) <= 4 for ax in fig.axes)
        assert all(len(ax.collections) == len(ax.lines) for ax in fig.axes)  # a seed band per line
        plt.close(fig)
        assert (study["out"] / "plots" / f"{field}.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------- the design

def test_one_factor_at_a_time_varies_each_axis_from_the_baseline_with_every_seed():
    grid = Grid(cells=["lstm", "gru"], design="ofat", seeds=[1, 2])
    add_setting(grid, "nlayers=1,2")
    add_setting(grid, "nhid=100,200,400")
    grid.check()
    found = points(grid, RunConfig())  # the example's 2 x 200 is the baseline
    settings = [(p.settings["nlayers"], p.settings["nhid"]) for p in found if p.cell == "lstm" and p.seed == 1]
    assert settings == [(2, 200), (1, 200), (2, 100), (2, 400)]
    assert len(found) == 2 * 4 * 2 and found[1].name == "lstm-nlayers2-nhid200-seed2"
    assert found[1].config(RunConfig(), {}).train.seed == 2
    base = RunConfig()
    base.model.nhid = 650  # not on the axis: the axis's first value is the baseline
    assert grid.baseline(base) == {"nlayers": 2, "nhid": 100}
    grid.design = "grid"
    assert len(points(grid, RunConfig())) == 2 * 6 * 2


def test_seeds_are_a_count_or_a_list_and_not_an_axis():
    assert parse_seeds("3", 1111) == [1111, 1112, 1113] and parse_seeds("7,3", 1111) == [7, 3]
    for text in ("0", "two", "1,x"):
        with pytest.raises(FastlmError, match="--seeds"):
            parse_seeds(text, 1)
    grid = Grid()
    add_setting(grid, "seed=1,2")
    with pytest.raises(FastlmError, match="--seeds"):
        grid.check()
    with pytest.raises(FastlmError, match="distinct"):
        Grid(seeds=[1, 1]).check()


def test_the_presets_are_both_cells_three_factors_two_values_and_two_seeds():
    from fastlm.sweep.presets import PRESETS

    for preset in PRESETS.values():
        base = RunConfig()
        base.update(preset.settings, origin="preset")
        grid = preset.grid().check()
        found = points(grid, base)
        configs = [point.config(base, grid.per_cell) for point in found]  # every point a valid run
        assert grid.cells == ["lstm", "gru"] and len(grid.axes) == 3 and len(grid.seeds) >= 2
        assert all(2 <= len(values) <= 3 for values in grid.axes.values())
        assert len(found) == 2 * (1 + 3) * len(grid.seeds)
        assert {c.model.decoder for c in configs} == {"adaptive"}
        assert {c.train.lr_rule for c in configs} == {"noise" if preset.name == "quick" else "noise-final"}
        assert {c.train.precision for c in configs} == {"fp32"}  # one setting, to be switched when bf16 is as good


def test_a_sweep_with_seeds_records_them_and_reports_each_point_over_its_seeds(tmp_path):
    from tests.helpers import run_cli, toy_corpus, write_corpus_folder

    (tmp_path / "data").mkdir()
    data = write_corpus_folder(toy_corpus(lines=(150, 40, 40)), tmp_path / "data")
    out = tmp_path / "sweep"
    status, _, err = run_cli("sweep", "--out", out, "--data", data, "--device", "cpu", "--emsize", 16, "--nhid", 16,
                             "--batch-size", 8, "--bptt", 12, "--eval-batch-size", 4, "--epochs", 1,
                             "--steps-per-epoch", 2, "--eval-batches", 1, "--cells", "lstm", "--set", "nlayers=1,2",
                             "--seeds", "2")
    assert status == 0, err
    state = json.loads((out / "sweep.json").read_text())
    assert state["baseline"] == {"nlayers": 2} and state["grid"]["design"] == "ofat" and state["wall_seconds"] > 0
    assert state["command"].startswith("fastlm sweep --out") and "--seeds 2" in state["command"]
    assert [(p["settings"]["nlayers"], p["seed"]) for p in state["points"]] == [(2, 1111), (2, 1112), (1, 1111),
                                                                                 (1, 1112)]
    for point in state["points"]:
        assert json.loads((out / point["run_dir"] / "config.json").read_text())["train"]["seed"] == point["seed"]
    report = json.loads((out / "report.json").read_text())
    assert [g["cells"]["lstm"]["seeds"] for g in report["groups"]] == [[1111, 1112], [1111, 1112]]
    assert report["baseline"] == {"nlayers": 2} and report["sources"] == ["."]
