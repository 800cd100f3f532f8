"""The report's figures, drawn from the report dict alone, as PNG and SVG.

For each varied field, ``plots/<field>.png`` and ``.svg``: the best validation perplexity and the training time
against the field's value, a line per cell (its seeds' mean) in a band (their min-max), over the runs whose
other fields are at the baseline; then a panel per cell of learning curves (validation perplexity after each
epoch), a line per value with its seeds' band. The cell is the colour (fixed per cell, so LSTM is the same blue
in every figure); no panel holds more lines than cells or values. With no varied field, one figure
``plots/runs`` of every run. Runs without a finished epoch have no line. matplotlib is imported when a figure
is drawn, so importing the report code stays light.
"""

from __future__ import annotations

import math
from itertools import accumulate
from pathlib import Path

from fastlm.report.groups import field_groups
from fastlm.report.tables import cell_label, cells_phrase, present_cells

CELL_COLOURS = {"lstm": "#1f77b4", "gru": "#ff7f0e", "rnn_tanh": "#2ca02c", "rnn_relu": "#d62728"}
OTHER_COLOUR = "#7f7f7f"
LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]


def _finite(value) -> float:
    """A value matplotlib can place; a missing or infinite perplexity leaves a gap instead of wrecking the axes."""
    return value if value is not None and math.isfinite(value) else float("nan")


def draw_curves(axes, runs: list[dict]) -> None:
    """Validation ppl against epoch (axes[0]) and against cumulative seconds (axes[1]), a line per run."""
    for run in runs:
        epochs = [epoch["epoch"] for epoch in run["epochs"]]
        ppls = [_finite(epoch["val_ppl"]) for epoch in run["epochs"]]
        clock = list(accumulate(epoch["seconds"] or 0.0 for epoch in run["epochs"]))
        look = {"color": CELL_COLOURS.get(run["cell"], OTHER_COLOUR), "marker": "o", "markersize": 3}
        axes[0].plot(epochs, ppls, label=run["name"], **look)
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


def run_bars(runs: list[dict]) -> tuple[list[str], dict]:
    """(the run names as group names, {(name, cell): the run's seconds per epoch})."""
    return [run["name"] for run in runs], {(run["name"], run["cell"]): run["seconds_per_epoch"] for run in runs}


def draw_band(ax, xs: list, stats: list, label: str, look: dict) -> None:
    """The mean as a line with markers and the min-max as a shaded band; missing points leave gaps."""
    means = [_finite(s["mean"]) if s else float("nan") for s in stats]
    lows = [_finite(s["min"]) if s else float("nan") for s in stats]
    highs = [_finite(s["max"]) if s else float("nan") for s in stats]
    ax.plot(xs, means, marker="o", markersize=4, label=label, **look)
    ax.fill_between(xs, lows, highs, alpha=0.2, color=look["color"], linewidth=0)


def draw_against_value(ax, rows: list[dict], cells: list[str], field: str, figure_name: str, ylabel: str) -> None:
    xs = list(range(len(rows)))
    for cell in cells:
        stats = [row["cells"][cell][figure_name] for row in rows]
        if any(stats):
            seeds = max((s["n"] for s in stats if s), default=0)
            draw_band(ax, xs, stats, f"{cell_label(cell)} ({seeds} seeds, band: min-max)",
                      {"color": CELL_COLOURS.get(cell, OTHER_COLOUR)})
    ax.set_xticks(xs, [str(row["value"]) for row in rows])
    ax.set(xlabel=field, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plain_log_ticks(ax) -> None:
    """A log axis labelled 400, 600, 900 rather than 4 x 10^2 (perplexities are read as plain numbers)."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def draw_learning_curves(ax, rows: list[dict], cell: str, field: str) -> None:
    for i, row in enumerate(rows):
        curve = row["cells"][cell]["curve"]
        if curve:
            draw_band(ax, list(range(1, len(curve) + 1)), curve, f"{field}={row['value']}",
                      {"color": CELL_COLOURS.get(cell, OTHER_COLOUR), "linestyle": LINE_STYLES[i % len(LINE_STYLES)]})
    ax.set(xlabel="epoch", ylabel="validation perplexity (log scale)",
           title=f"{cell_label(cell)}: learning curves by {field}")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no run has finished an epoch yet", ha="center", transform=ax.transAxes)


def field_figure(plt, report: dict, field: str):
    """Perplexity and time against the value, then each cell's learning curves."""
    rows = field_groups(report["runs"], field, report["cells"], report.get("baseline"))
    cells = report["cells"]
    fig, axes = plt.subplots(1, 2 + len(cells), figsize=(5.2 * (2 + len(cells)), 4.6))
    draw_against_value(axes[0], rows, cells, field, "best_val_ppl", "best validation perplexity")
    axes[0].set_title("validation perplexity")
    draw_against_value(axes[1], rows, cells, field, "train_seconds", "training time per run (s)")
    axes[1].set_title("training time")
    for ax, cell in zip(axes[2:], cells):
        ax.sharey(axes[2])  # the cells' curves on one scale, side by side
        draw_learning_curves(ax, rows, cell, field)
    where = " (other settings at the baseline)" if report.get("baseline") else ""
    fig.suptitle(f"{cells_phrase(cells) or 'no runs'} by {field}{where}")
    fig.tight_layout()
    return fig


def figure(plt, report: dict, field):
    """The figure of ``field`` (None: every run, no field: three panels of a line per run)."""
    if field:
        return field_figure(plt, report, field)
    runs = [run for run in report["runs"] if run["epochs"]]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    draw_curves(axes, runs)
    groups, heights = run_bars(runs)
    draw_bars(axes[2], groups, present_cells(runs), heights, "run", "time per epoch")
    fig.suptitle(f"{cells_phrase(present_cells(runs)) or 'no runs'}: every run")
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
