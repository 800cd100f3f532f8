"""report.md: the report dict (fastlm.report.command.build_report) as a page people read.

The conditions come first (machine and software, then the settings and the notes), so that no number below is
read without them; then the points table with the cells side by side, a table per varied field, the runs that
did not finish and why, and the plots. Perplexities have 2 decimals, seconds 1, tokens/s and parameter counts
are whole numbers with thousands separators; "—" marks a figure a run does not have.
"""

from __future__ import annotations

import math

from fastlm.report.conditions import MACHINE, SETTINGS
from fastlm.report.findings import setting_text
from fastlm.report.tables import cell_label, cells_phrase

MISSING = "—"
LABELS = {"device": "device", "device_name": "device name", "threads": "CPU threads", "torch": "torch",
          "cuda": "CUDA", "cudnn": "cuDNN", "triton": "triton", "git_sha": "git commit", "host": "host",
          "backend": "backend",
          "precision": "precision", "step": "training step", "seed": "seed", "data_source": "data",
          "epochs": "epochs", "steps_per_epoch": "batches per epoch", "eval_batches": "evaluation batches",
          "batch_size": "batch size", "eval_batch_size": "evaluation batch size", "lr": "initial lr",
          "decoder": "decoder", "lr_rule": "lr rule (when to divide it by 4)"}
PRECISION = {"fp32": "fp32, exact (TF32 off)", "tf32": "tf32 (fp32 with TF32 GEMMs and recurrence)",
             "bf16": "bf16 with fp32 master weights"}
WHEN_NONE = {"steps_per_epoch": "full passes over the training split", "eval_batches": "the whole splits",
             "lr_rule": "example"}
COLUMNS = ("best val ppl", "val ppl after each epoch", "test ppl", "s/epoch", "tokens/s", "parameters")


def _number(value, digits: int) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}"


def ppl(value) -> str:
    return _number(value, 2)


def seconds(value) -> str:
    """1 decimal; a time too short for that (a toy run's epoch) keeps 2 significant digits, not a false 0.0."""
    if value is not None and 0 < abs(value) < 0.05:
        return f"{value:.2g}"
    return _number(value, 1)


def whole(value) -> str:
    return _number(value, 0)


def ppl_list(values: list) -> str:
    return ", ".join(map(ppl, values)) or MISSING


def cell_text(text) -> str:
    """Text that stays inside one table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def condition_value(name: str, value) -> str:
    if name == "precision":
        return PRECISION.get(value, str(value))
    if value is None:
        return WHEN_NONE.get(name, "none")
    return str(value)


def conditions_lines(conditions: dict) -> list[str]:
    lines = ["## Conditions", "", "Machine and software:", ""]
    lines += [f"- {LABELS[name]}: {', '.join(condition_value(name, v) for v in conditions[name]) or MISSING}"
              for name in MACHINE]
    lines += ["", "Settings:", ""]
    lines += [f"- {LABELS[name]}: {', '.join(condition_value(name, v) for v in conditions[name]) or MISSING}"
              for name in SETTINGS]
    lr = conditions["lr"]
    lr_text = (", ".join(f"{cell_label(cell)} {', '.join(map(str, values))}" for cell, values in lr.items())
               if isinstance(lr, dict) else ", ".join(map(str, lr)))
    lines += [f"- {LABELS['lr']}: {lr_text or MISSING}", "", "Notes:", ""]
    lines += [f"- {note}" for note in conditions["notes"]] or ["- none"]
    return lines + [""]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell_text(cell) for cell in row) + " |" for row in rows] + [""]


def point_cells(entry) -> list[str]:
    """One cell's six columns of the points table."""
    if entry is None:
        return [MISSING] * len(COLUMNS)
    if "best_val_ppl" not in entry:  # a failed run: its reason instead of figures
        return [f"**{entry['status']}**: {entry['reason'] or 'no reason recorded'}"] + [""] * (len(COLUMNS) - 1)
    best = ppl(entry["best_val_ppl"]) + ("" if entry["status"] == "done" else f" ({entry['status']})")
    return [best, ppl_list(entry["val_ppl"]), ppl(entry["test_ppl"]), seconds(entry["seconds_per_epoch"]),
            whole(entry["tokens_per_s"]), whole(entry["parameters"])]


def points_lines(report: dict) -> list[str]:
    header = [*report["varied"]] + [f"{cell_label(cell)} {column}" for cell in report["cells"] for column in COLUMNS]
    rows = [[str(row["settings"][field]) for field in report["varied"]]
            + [text for cell in report["cells"] for text in point_cells(row["cells"][cell])]
            for row in report["tables"]["points"]]
    return ["## Points", "", "Each run's own figures; s/epoch is the mean training time of an epoch.", "",
            *table(header, rows)]


def summary_cells(summary: dict) -> list[str]:
    runs = str(summary["n"]) + (f" ({summary['failed']} failed)" if summary["failed"] else "")
    return [ppl(summary["best_val_ppl"]), ppl_list(summary["val_ppl"]), ppl(summary["test_ppl"]),
            seconds(summary["seconds_per_epoch"]), whole(summary["tokens_per_s"]), whole(summary["parameters"]), runs]


def field_lines(report: dict, field: str) -> list[str]:
    header = [field] + [f"{cell_label(cell)} {column}" for cell in report["cells"] for column in (*COLUMNS, "runs")]
    rows = [[str(row["value"])] + [text for cell in report["cells"] for text in summary_cells(row["cells"][cell])]
            for row in report["tables"]["fields"][field]]
    over = (f"Means over the runs with each {field}, the other settings at the baseline" if report.get("baseline")
            else f"Means over the runs with each {field}")
    return [f"## By {field}", "", f"{over}, failed runs left out (and counted).", "", *table(header, rows)]


def unfinished_lines(runs: list[dict]) -> list[str]:
    lines = ["## Failures, divergences and unfinished runs", ""]
    for run in runs:
        if run["status"] != "done":
            settings = ", ".join(f"{field} {value}" for field, value in run["settings"].items())
            why = run["reason"] or run["diverged"] or {"budget": "paused by its budget"}.get(run["status"], "")
            lines.append(f"- `{run['name']}` ({cell_label(run['cell'])}{', ' + settings if settings else ''}): "
                         f"{run['status']}{': ' + why if why else ''}")
    return (lines if len(lines) > 2 else lines + ["Every run finished its epochs."]) + [""]


def plot_lines(plots: list[str]) -> list[str]:
    lines = ["## Plots", ""]
    for png in (path for path in plots if path.endswith(".png")):
        svg = png[:-len(".png")] + ".svg"
        lines.append(f"![{png}]({png}) ([SVG]({svg}))" if svg in plots else f"![{png}]({png})")
    return lines + [""]


def title(report: dict) -> str:
    cells = cells_phrase(report["cells"]) or "runs"
    over = f" by {', '.join(report['varied'])}" if report["varied"] else ""
    return f"# fastlm report: {cells}{over}"


def spread_text(stats, digits: int = 0, unit: str = "") -> str:
    """"412 +- 9 (403-421)"; one run: its value."""
    if stats is None:
        return MISSING
    text = f"{stats['mean']:,.{digits}f}{unit}"
    if stats["n"] > 1:
        text += f" +- {stats['std']:,.{digits}f} ({stats['min']:,.{digits}f}-{stats['max']:,.{digits}f})"
    return text


def study_lines(report: dict) -> list[str]:
    """What was run: the design, the seeds, the preset's choices, the wall time."""
    lines = []
    seeds = sorted({run["seed"] for run in report["runs"] if run["seed"] is not None})
    if report.get("baseline"):
        lines.append(f"One setting varied at a time around the baseline {setting_text(report['baseline'])}; "
                     f"{len(seeds)} seed(s) per point ({', '.join(map(str, seeds))}).")
    for sweep in report["sweeps"]:
        if sweep.get("preset"):
            lines += [f"Preset --{sweep['preset']['name']}: {sweep['preset']['why']}",
                      f"Why these settings: {sweep['preset']['axes_why']}"]
        if sweep.get("wall_seconds"):
            lines.append(f"The sweep in {sweep['path']} took {sweep['wall_seconds'] / 60:,.1f} minutes of wall time.")
    loads = [run["max_load"] for run in report["runs"] if run.get("max_load") is not None]
    if loads:
        lines.append(f"The machine's load average reached {max(loads):.1f} while the runs trained, their own threads "
                     f"included (runs whose timings other work made unreliable are named under Conditions).")
    return lines


def summary_lines(report: dict) -> list[str]:
    lines = ["## Summary", "", *study_lines(report), ""]
    lines += [f"- {sentence}" for sentence in report["findings"]["summary"]]
    commands = [sweep["command"] for sweep in report["sweeps"] if sweep.get("command")]
    if commands:
        lines += ["", "Reproduce with:", "", "```", *commands, "```"]
    return lines + [""]


def findings_lines(report: dict) -> list[str]:
    lines = ["## Findings", "",
             "Validation perplexity is each run's best (the model it keeps), training time its epochs' training "
             "seconds in all; +- is the standard error of a difference over the seeds. A difference is beyond "
             "seed noise when it exceeds twice that and the seeds' ranges do not overlap.", ""]
    for field, sentences in report["findings"]["fields"].items():
        lines += [f"### {field}", "", *[f"- {sentence}" for sentence in sentences], ""]
    return lines


def groups_lines(report: dict) -> list[str]:
    header = [*report["varied"]] + [f"{cell_label(cell)} {column}" for cell in report["cells"]
                                    for column in ("best val ppl", "training s", "seeds")] + ["flagged"]
    rows = []
    for group in report["groups"]:
        cells = group["cells"]
        flagged = [name for cell in cells.values() for name in cell["flagged"]]
        rows.append([str(group["settings"].get(field)) for field in report["varied"]]
                    + [text for cell in report["cells"] for text in (
                        spread_text(cells[cell]["best_val_ppl"], 1), spread_text(cells[cell]["train_seconds"], 0),
                        str(len(cells[cell]["seeds"])) + (f" ({len(cells[cell]['failed'])} failed)"
                                                          if cells[cell]["failed"] else ""))]
                    + [", ".join(flagged) or ""])
    return ["## Points over seeds", "", "Mean +- standard deviation (min-max) over each point's seeds.", "",
            *table(header, rows), ""]


def flagged_lines(runs: list[dict]) -> list[str]:
    flagged = [f"- `{run['name']}`: {'; '.join(run['flags'])}" for run in runs if run["flags"]]
    return ["## Flagged runs", "", *(flagged or ["No run's validation rose beyond its noise and no loss spiked."]),
            ""]


def render(report: dict) -> str:
    """report.md's text; ``report["plots"]`` (paths relative to the report) is linked when present."""
    lines = [title(report), "", f"{len(report['runs'])} runs from {', '.join(report['sources'])}.", "",
             *summary_lines(report), *findings_lines(report), *conditions_lines(report["conditions"]),
             *groups_lines(report), *flagged_lines(report["runs"]), *points_lines(report)]
    for field in report["varied"]:
        lines += field_lines(report, field)
    lines += unfinished_lines(report["runs"])
    if report.get("plots"):
        lines += plot_lines(report["plots"])
    return "\n".join(lines)
