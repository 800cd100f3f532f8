"""`fastlm report` as a library: every figure of report.json recomputed here from the runs' own files, the
failed point and the conditions named in report.json and report.md, real PNG and SVG plots, plain run folders,
and the statuses and notes a run's metrics lead to."""

import json
import shutil
import statistics
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch

from fastlm.errors import FastlmError
from fastlm.report.command import build_report, run_report
from tests.helpers import run_cli, toy_corpus, write_corpus_folder

FAILED_REASON = "the loss or gradients became non-finite at step 3; training stopped"
GRID = {"cells": ["lstm", "gru", "rnn_tanh"], "axes": {"nhid": [16, 24]}, "per_cell": {"gru": {"lr": 10.0}}}


def train(data: Path, run_dir: Path, cell: str, nhid: int, *extra) -> Path:
    status, _, stderr = run_cli("train", "--data", data, "--device", "cpu", "--cell", cell, "--nhid", nhid,
                                "--emsize", 16, "--nlayers", 1, "--batch-size", 8, "--bptt", 12,
                                "--eval-batch-size", 4, "--epochs", 2, "--steps-per-epoch", 4, "--eval-batches", 3,
                                "--log-interval", 2, "--run-dir", run_dir, *extra)
    assert status == 0, stderr
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sweep folder (lstm, gru, rnn_tanh x nhid 16, 24; gru at lr 10; rnn_tanh nhid 24 failed with no
    folder) and a plain run paused by --max-steps."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    data.mkdir()
    write_corpus_folder(toy_corpus(lines=(150, 40, 40)), data)
    sweep, points = root / "sweep", []
    for cell in GRID["cells"]:
        for nhid in GRID["axes"]["nhid"]:
            name = f"{cell}-nhid{nhid}"
            failed = cell == "rnn_tanh" and nhid == 24
            if not failed:
                train(data, sweep / "points" / name, cell, nhid, *(("--lr", 10) if cell == "gru" else ()))
            points.append({"name": name, "cell": cell, "settings": {"nhid": nhid}, "run_dir": f"points/{name}",
                           "status": "failed" if failed else "done", "reason": FAILED_REASON if failed else None,
                           "exit_status": 3 if failed else 0})
    (sweep / "sweep.json").write_text(json.dumps({
        "format": "fastlm-sweep", "version": 1, "grid": GRID, "base": {}, "quick": False,
        "budget": {"max_minutes_per_run": None, "max_steps": None}, "points": points}))
    paused = train(data, root / "paused", "lstm", 16, "--max-steps", 5)
    return {"root": root, "sweep": sweep, "points": {p["name"]: sweep / p["run_dir"] for p in points},
            "paused": paused}


@pytest.fixture(scope="module")
def report(runs):
    return run_report([runs["sweep"]], runs["root"] / "out")


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def middle(values: list[float]) -> float:
    ordered, half = sorted(values), len(values) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def expected(run_dir: Path) -> dict:
    """A run's figures, recomputed from its files."""
    epochs = records(run_dir, "epoch")
    train_seconds = [epoch["train_seconds"] for epoch in epochs]
    return {"best_val_ppl": min(epoch["val_ppl"] for epoch in epochs),
            "val_ppl": [epoch["val_ppl"] for epoch in epochs],
            "test_ppl": records(run_dir, "test")[-1]["test_ppl"],
            "seconds": sum(epoch["seconds"] for epoch in epochs), "train_seconds": sum(train_seconds),
            "seconds_per_epoch": sum(train_seconds) / len(train_seconds),
            "tokens_per_s": middle([log["tokens_per_s"] for log in records(run_dir, "log")]),
            "parameters": json.loads((run_dir / "config.json").read_text())["parameters"]}


def test_each_run_s_figures_are_its_files(runs, report):
    by_name = {run["name"]: run for run in report["runs"]}
    assert set(by_name) == set(runs["points"])
    for name, folder in runs["points"].items():
        if name == "rnn_tanh-nhid24":
            continue
        run, want = by_name[name], expected(folder)
        # Named relative to the report's folder (a report that moves with its runs names no machine's paths).
        assert run["status"] == "done" and (runs["root"] / "out" / run["run_dir"]).resolve() == folder.resolve()
        assert [epoch["val_ppl"] for epoch in run["epochs"]] == want["val_ppl"]
        assert [epoch["epoch"] for epoch in run["epochs"]] == [1, 2]
        assert run["parameters"] == want["parameters"]
        for figure in ("best_val_ppl", "test_ppl", "seconds", "train_seconds", "seconds_per_epoch", "tokens_per_s"):
            assert run[figure] == pytest.approx(want[figure], rel=1e-12), figure
    saved = json.loads((runs["root"] / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))


def test_field_table_means_are_the_runs_means(runs, report):
    rows = report["tables"]["fields"]["nhid"]
    assert [row["value"] for row in rows] == [16, 24]
    for row in rows:
        for cell in ("lstm", "gru", "rnn_tanh"):
            folders = [folder for name, folder in runs["points"].items()
                       if name == f"{cell}-nhid{row['value']}" and folder.is_dir()]
            summary, want = row["cells"][cell], [expected(folder) for folder in folders]
            assert summary["n"] == len(want) and summary["failed"] == 1 - len(want)
            if not want:
                assert summary["best_val_ppl"] is None and summary["val_ppl"] == []
                continue
            for figure in ("best_val_ppl", "test_ppl", "seconds_per_epoch", "tokens_per_s"):
                assert summary[figure] == pytest.approx(statistics.fmean(w[figure] for w in want)), figure
            assert summary["val_ppl"] == pytest.approx([statistics.fmean(v) for v in zip(*(w["val_ppl"]
                                                                                           for w in want))])
            assert summary["parameters"] == statistics.fmean(w["parameters"]["total"] for w in want)
    # A bigger hidden layer has more parameters, in every cell: the rows are not the same numbers twice.
    assert rows[1]["cells"]["lstm"]["parameters"] > rows[0]["cells"]["lstm"]["parameters"]


def test_both_cells_at_every_value_and_the_failed_point(runs, report):
    assert report["varied"] == ["nhid"] and report["cells"] == ["lstm", "gru", "rnn_tanh"]
    points = {row["settings"]["nhid"]: row["cells"] for row in report["tables"]["points"]}
    assert sorted(points) == [16, 24]
    for nhid, cells in points.items():
        assert cells["lstm"]["status"] == cells["gru"]["status"] == "done"
        assert cells["lstm"]["best_val_ppl"] > 0 and cells["gru"]["best_val_ppl"] > 0
    failed = next(run for run in report["runs"] if run["name"] == "rnn_tanh-nhid24")
    assert failed["status"] == "failed" and failed["reason"] == FAILED_REASON and failed["epochs"] == []
    assert points[24]["rnn_tanh"] == {"name": "rnn_tanh-nhid24", "status": "failed", "reason": FAILED_REASON}
    assert any(FAILED_REASON in note for note in report["conditions"]["notes"])
    markdown = (runs["root"] / "out" / "report.md").read_text()
    assert markdown.count(FAILED_REASON) >= 2  # in the points table and in the failures


def test_conditions_name_the_machine_and_settings(runs, report):
    conditions = report["conditions"]
    assert conditions["device"] == ["cpu"] and conditions["torch"] == [torch.__version__]
    assert conditions["backend"] == ["cudnn"] and conditions["precision"] == ["fp32"] and conditions["seed"] == [1111]
    assert conditions["steps_per_epoch"] == [4] and conditions["eval_batches"] == [3] and conditions["epochs"] == [2]
    assert conditions["lr"] == {"lstm": [20.0], "gru": [10.0], "rnn_tanh": [20.0]}
    notes = " ".join(conditions["notes"])
    assert "--steps-per-epoch 4" in notes and "--eval-batches 3" in notes
    markdown = (runs["root"] / "out" / "report.md").read_text()
    for text in ("cpu", torch.__version__, "cudnn", "fp32, exact (TF32 off)", "1111", "--steps-per-epoch 4",
                 "--eval-batches 3", "GRU 10.0"):
        assert text in markdown, text


def test_markdown_order_and_number_format(runs, report):
    markdown = (runs["root"] / "out" / "report.md").read_text()
    sections = ["# fastlm report", "## Conditions", "Machine and software", "Settings:", "Notes:", "## Points",
                "## By nhid", "## Failures", "## Plots"]
    positions = [markdown.index(section) for section in sections]
    assert positions == sorted(positions)
    lstm = next(run for run in report["runs"] if run["name"] == "lstm-nhid16")
    spe = lstm["seconds_per_epoch"]
    seconds = f"{spe:.2g}" if spe < 0.05 else f"{spe:,.1f}"  # a toy epoch is too short for 1 decimal
    for text in (f"{lstm['best_val_ppl']:,.2f}", f"{lstm['test_ppl']:,.2f}", seconds,
                 f"{lstm['tokens_per_s']:,.0f}", f"{lstm['parameters']['total']:,}", "plots/nhid.png"):
        assert text in markdown, text
    assert "LSTM best val ppl" in markdown and "GRU best val ppl" in markdown


def test_plots_are_real_png_and_svg(runs, report):
    plots = runs["root"] / "out" / "plots"
    assert report["plots"] == ["plots/nhid.png", "plots/nhid.svg"]
    png = (plots / "nhid.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    root = ElementTree.parse(plots / "nhid.svg").getroot()
    assert root.tag.endswith("svg") and len(list(root.iter())) > 100


def test_plain_run_folders_find_the_varied_fields_from_their_configs(runs):
    folders = [folder for name, folder in runs["points"].items() if not name.startswith("rnn_tanh")]
    report = build_report(folders)
    # nhid differs within a cell; lr only from cell to cell (a per-cell setting, not a varied field).
    assert report["varied"] == ["nhid"] and report["cells"] == ["lstm", "gru"]
    assert report["conditions"]["lr"] == {"lstm": [20.0], "gru": [10.0]}
    for run in report["runs"]:
        assert run["name"] == Path(run["run_dir"]).name and run["status"] == "done"
        assert run["settings"] == {"nhid": int(run["name"].split("nhid")[1])}
        assert run["best_val_ppl"] == pytest.approx(expected(Path(run["run_dir"]))["best_val_ppl"])
    assert all(row["cells"]["gru"]["n"] == 1 for row in report["tables"]["fields"]["nhid"])


def test_a_paused_run_alone_is_a_budget_run_plotted_as_runs(runs):
    report = run_report([runs["paused"]], runs["root"] / "paused-report")
    [run] = report["runs"]
    pause = records(runs["paused"], "pause")[-1]
    assert run["status"] == "budget" and run["test_ppl"] is None and len(run["epochs"]) == 1
    assert run["pause"]["val_ppl"] == pause["val_ppl"] and run["pause"]["test_ppl"] == pause["test_ppl"]
    assert report["varied"] == [] and report["plots"] == ["plots/runs.png", "plots/runs.svg"]
    notes = " ".join(report["conditions"]["notes"])
    assert "--max-steps 5" in notes and "paused by their budget" in notes
    assert (runs["root"] / "paused-report" / "plots" / "runs.png").read_bytes().startswith(b"\x89PNG")


def copy_with(source: Path, target: Path, keep: int, *extra: dict) -> Path:
    """A run folder's copy, its metrics cut to the first ``keep`` records and ``extra`` appended. The copied
    records lose any ``timing_unreliable`` mark the machine's load gave them while the fixture trained (other
    tests' processes may still count in the load average): only ``extra`` says which timings are unreliable."""
    shutil.copytree(source, target)
    kept = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()[:keep]]
    for record in kept:
        record.pop("timing_unreliable", None)
    lines = [json.dumps(r) for r in kept] + [json.dumps(r) for r in extra]
    (target / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return target


def test_statuses_of_plain_runs_their_notes_and_means(runs, tmp_path):
    source = runs["points"]["lstm-nhid16"]
    total = len((source / "metrics.jsonl").read_text().splitlines())
    busy = {"kind": "log", "epoch": 2, "batch": 4, "step": 8, "tokens_per_s": 1.0, "timing_unreliable": True}
    message = "the loss or gradients became non-finite at step 6"
    folders = [copy_with(source, tmp_path / "busy", total, busy),
               copy_with(source, tmp_path / "cut", 3),  # two log lines and the first epoch
               copy_with(source, tmp_path / "bad", 3, {"kind": "diverged", "epoch": 2, "step": 6, "message": message}),
               runs["points"]["lstm-nhid24"]]
    report = build_report(folders)
    status = {run["name"]: run["status"] for run in report["runs"]}
    assert status == {"busy": "done", "cut": "interrupted", "bad": "diverged", "lstm-nhid24": "done"}
    busy_run, cut_run, bad_run, _ = report["runs"]
    assert busy_run["timing_unreliable"] and not cut_run["timing_unreliable"]
    logs = [log["tokens_per_s"] for log in records(tmp_path / "busy", "log")]
    assert busy_run["tokens_per_s"] == pytest.approx(middle(logs)) and 1.0 in logs
    notes = report["conditions"]["notes"]
    assert any("unreliable" in note and "busy" in note and "cut" not in note for note in notes)
    assert any(note.startswith("bad diverged") and message in note for note in notes)
    assert bad_run["reason"] == bad_run["diverged"] == message
    assert any("cut (interrupted)" in note for note in notes)
    # nhid 16: busy and cut averaged (the second epoch only busy reached), the diverged run counted, left out.
    summary = report["tables"]["fields"]["nhid"][0]["cells"]["lstm"]
    assert (summary["n"], summary["failed"]) == (2, 1)
    assert summary["best_val_ppl"] == pytest.approx((busy_run["best_val_ppl"] + cut_run["best_val_ppl"]) / 2)
    assert summary["val_ppl"] == pytest.approx([(busy_run["epochs"][0]["val_ppl"] + cut_run["epochs"][0]["val_ppl"])
                                                / 2, busy_run["epochs"][1]["val_ppl"]])
    assert summary["test_ppl"] == pytest.approx(busy_run["test_ppl"])  # cut has no test record
    # Three runs of the same settings: a points row each; the diverged one gives its reason, not figures.
    rows = report["tables"]["points"]
    assert [row["cells"]["lstm"]["name"] for row in rows] == ["busy", "cut", "bad", "lstm-nhid24"]
    assert rows[2]["cells"]["lstm"] == {"name": "bad", "status": "diverged", "reason": message}


def test_a_sweep_and_a_run_folder_together(runs):
    report = build_report([runs["sweep"], runs["paused"]])
    assert len(report["runs"]) == 7 and report["runs"][-1]["name"] == "paused"
    assert report["varied"][0] == "nhid" and "max_steps" in report["varied"]


def test_a_folder_that_holds_no_run_is_refused(tmp_path):
    with pytest.raises(FastlmError, match="neither a sweep folder"):
        build_report([tmp_path])
