"""The report's figures, drawn from the report dict alone, as PNG and SVG.

For each varied field, ``plots/<field>.png`` and ``.svg`` with three panels: validation perplexity against
epoch, the same against wall-clock time (the epochs' cumulative seconds, training and validation), and the
mean training seconds per epoch as bars grouped by the field's value, a bar per cell. One line per run; the
cell is the colour (fixed per cell, so LSTM is the same blue in every figure), the field's value the line
style. With no varied field, one figure ``plots/runs`` of every run. Runs without a finished epoch have no
line. matplotlib is imported when a figure is drawn, so importing the report code stays light.
"""

from __future__ import annotations

import math
from itertools import accumulate
from pathlib import Path

from fastlm.report.collect import value_key
from fastlm.report.tables import cell_label, cells_phrase, field_values, present_cells

CELL_COLOURS = {"lstm": "#1f77b4", "gru": "#ff7f0e", "rnn_tanh": "#2ca02c", "rnn_relu": "#d62728"}
OTHER_COLOUR = "#7f7f7f"
LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]


def _finite(value) -> float:
    """A value matplotlib can place; a missing or infinite perplexity leaves a gap instead of wrecking the axes."""
    return value if value is not None and math.isfinite(value) else float("nan")


def _line_label(run: dict, field) -> str:
    return f"{cell_label(run['cell'])} {field}={run['settings'].get(field)}" if field else run["name"]


def draw_curves(axes, runs: list[dict], field, styles: dict) -> None:
    """Validation ppl against epoch (axes[0]) and against cumulative seconds (axes[1]), a line per run."""
    labelled = set()
    for run in runs:
        epochs = [epoch["epoch"] for epoch in run["epochs"]]
        ppls = [_finite(epoch["val_ppl"]) for epoch in run["epochs"]]
        clock = list(accumulate(epoch["seconds"] or 0.0 for epoch in run["epochs"]))
        look = {"color": CELL_COLOURS.get(run["cell"], OTHER_COLOUR), "marker": "o", "markersize": 3,
                "linestyle": styles.get(value_key(run["settings"].get(field)) if field else None, "-")}
        # One legend entry per cell and value: the runs that share them (other fields differing) share a look.
        label = _line_label(run, field)
        axes[0].plot(epochs, ppls, label=None if label in labelled else label, **look)
        labelled.add(label)
        axes[1].plot(clock, ppls, **look)
    axes[0].set(xlabel="epoch", ylabel="validation perplexity (log scale)", title="validation perplexity by epoch")
    axes[1].set(xlabel="wall-clock time (s, training + validation, cumulative)",
                ylabel="validation perplexity (log scale)", title="validation perplexity by time")
    for ax in axes[:2]:
        # Perplexity spans orders of magnitude early in training (and when a run diverges): a log axis keeps the
        # comparison of the good runs readable.
        ax.set_yscale("log")
    # Epochs are whole numbers: whole ticks, with room around the first and last.
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_xlim(0.5, max((epoch["epoch"] for run in runs for epoch in run["epochs"]), default=1) + 0.5)
    if runs:
        axes[0].legend(fontsize="small")
    else:  # a sweep whose runs have not finished an epoch yet: an empty figure that says so
        axes[0].text(0.5, 0.5, "no run has finished an epoch yet", ha="center", transform=axes[0].transAxes)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)


def draw_bars(ax, groups: list[str], cells: list[str], heights: dict, xlabel: str, title: str) -> None:
    """Grouped bars: a group per entry of ``groups``, a bar per cell; ``heights[(group, cell)]`` or no bar."""
    width = 0.8 / max(len(cells), 1)
    for i, cell in enumerate(cells):
        xs = [x + (i - (len(cells) - 1) / 2) * width for x, group in enumerate(groups)
              if heights.get((group, cell)) is not None]
        ys = [heights[(group, cell)] for group in groups if heights.get((group, cell)) is not None]
        ax.bar(xs, ys, width, label=cell_label(cell), color=CELL_COLOURS.get(cell, OTHER_COLOUR))
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0)
    ax.set(xlabel=xlabel, ylabel="training seconds per epoch (s)", title=title)
    if cells:
        ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def field_bars(report: dict, field: str) -> tuple[list[str], dict]:
    """(the field's values as group names, {(value, cell): mean seconds per epoch}) from the field's table."""
    rows = report["tables"]["fields"][field]
    heights = {(str(row["value"]), cell): summary["seconds_per_epoch"]
               for row in rows for cell, summary in row["cells"].items()}
    return [str(row["value"]) for row in rows], heights


def run_bars(runs: list[dict]) -> tuple[list[str], dict]:
    """(the run names as group names, {(name, cell): the run's seconds per epoch})."""
    return [run["name"] for run in runs], {(run["name"], run["cell"]): run["seconds_per_epoch"] for run in runs}


def figure(plt, report: dict, field):
    """One figure of three panels for ``field`` (None: every run, no field)."""
    runs = [run for run in report["runs"] if run["epochs"]]
    values = field_values(runs, field) if field else []
    styles = {value_key(value): LINE_STYLES[i % len(LINE_STYLES)] for i, value in enumerate(values)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    draw_curves(axes, runs, field, styles)
    groups, heights = field_bars(report, field) if field else run_bars(runs)
    draw_bars(axes[2], groups, present_cells(runs), heights, field or "run",
              "time per epoch, mean over the runs" if field else "time per epoch")
    cells = cells_phrase(present_cells(runs)) or "no runs"
    fig.suptitle(f"{cells} by {field}" if field else f"{cells}: every run")
    fig.tight_layout()
    return fig


def write_plots(report: dict, folder: Path) -> list[Path]:
    """Writes a PNG and an SVG per varied field (or one pair, ``runs``, without one) into ``folder``; returns
    the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (and no display needed)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for field in report["varied"] or [None]:
        fig = figure(plt, report, field)
        for suffix in (".png", ".svg"):
            path = folder / f"{field or 'runs'}{suffix}"
            fig.savefig(path, format=suffix[1:], dpi=110)
            written.append(path)
        plt.close(fig)
    return written
