"""The report's tables, computed from the runs' entries (fastlm.report.collect.run_entry).

``field_tables``: for each varied field, a row per value and in it an entry per cell: the means over that
cell's runs with that value, failed and diverged runs left out (and counted), so LSTM and GRU sit side by side
at every value. ``point_rows``: a row per combination of the varied fields, each cell's run's own figures side
by side (or why it failed).
"""

from __future__ import annotations

import statistics
from numbers import Number
from typing import Optional

from fastlm.config import CELLS
from fastlm.report.collect import FAILED, value_key

CELL_LABELS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN (tanh)", "rnn_relu": "RNN (ReLU)"}


def cell_label(cell: str) -> str:
    return CELL_LABELS.get(cell, str(cell).upper())


def cells_phrase(cells: list[str]) -> str:
    """"LSTM", "LSTM and GRU", "LSTM, GRU and RNN (tanh)"."""
    labels = [cell_label(cell) for cell in cells]
    return " and ".join(filter(None, [", ".join(labels[:-1]), *labels[-1:]]))


def present_cells(runs: list[dict]) -> list[str]:
    """The cells of the runs: fastlm's own in their usual order, then any other in the order found."""
    found = [run["cell"] for run in runs if run["cell"]]
    return [cell for cell in CELLS if cell in found] + [cell for cell in dict.fromkeys(found) if cell not in CELLS]


def sort_key(value) -> tuple:
    """Numbers in numeric order, then everything else by its text, None last."""
    if value is None:
        return (2, "")
    if isinstance(value, Number) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def mean(values) -> Optional[float]:
    """The mean of the values that are there; None when none is."""
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def epoch_means(runs: list[dict]) -> list[float]:
    """Mean validation ppl after each epoch, over the runs that reached it."""
    longest = max((len(run["epochs"]) for run in runs), default=0)
    return [mean(run["epochs"][i]["val_ppl"] for run in runs if len(run["epochs"]) > i) for i in range(longest)]


def cell_summary(runs: list[dict]) -> dict:
    """Means over the runs that did not fail and finished at least one epoch; ``n`` counts them."""
    kept = [run for run in runs if run["status"] not in FAILED and run["epochs"]]
    return {"n": len(kept), "failed": sum(run["status"] in FAILED for run in runs),
            "best_val_ppl": mean(run["best_val_ppl"] for run in kept),
            "val_ppl": epoch_means(kept),
            "test_ppl": mean(run["test_ppl"] for run in kept),
            "seconds_per_epoch": mean(run["seconds_per_epoch"] for run in kept),
            "tokens_per_s": mean(run["tokens_per_s"] for run in kept),
            "parameters": mean((run["parameters"] or {}).get("total") for run in kept)}


def field_values(runs: list[dict], field: str) -> list:
    """The distinct values the runs have for ``field``, sorted."""
    seen = {value_key(run["settings"].get(field)): run["settings"].get(field) for run in runs}
    return sorted(seen.values(), key=sort_key)


def at_baseline(run: dict, baseline: Optional[dict], but: str) -> bool:
    """The run has every varied field but ``but`` at its baseline value (no baseline: any run does)."""
    return baseline is None or all(value_key(run["settings"].get(name)) == value_key(value)
                                   for name, value in baseline.items() if name != but and name in run["settings"])


def field_table(runs: list[dict], field: str, cells: list[str], baseline: Optional[dict] = None) -> list[dict]:
    """A row per value of ``field``: with a baseline, over the runs whose other fields are at the baseline (the
    one-factor-at-a-time reading); without, over all the runs with that value."""
    rows = []
    runs = [run for run in runs if at_baseline(run, baseline, field)]
    for value in field_values(runs, field):
        matching = [run for run in runs if value_key(run["settings"].get(field)) == value_key(value)]
        rows.append({"value": value, "cells": {cell: cell_summary([run for run in matching if run["cell"] == cell])
                                               for cell in cells}})
    return rows


def field_tables(runs: list[dict], varied: list[str], cells: list[str],
                 baseline: Optional[dict] = None) -> dict[str, list[dict]]:
    return {field: field_table(runs, field, cells, baseline) for field in varied}


def point_entry(run: dict) -> dict:
    """One run's figures in the points table; a failed run gives its reason instead."""
    if run["status"] in FAILED:
        return {"name": run["name"], "status": run["status"], "reason": run["reason"]}
    return {"name": run["name"], "status": run["status"], "reason": run["reason"],
            "best_val_ppl": run["best_val_ppl"], "val_ppl": [epoch["val_ppl"] for epoch in run["epochs"]],
            "test_ppl": run["test_ppl"], "seconds_per_epoch": run["seconds_per_epoch"],
            "tokens_per_s": run["tokens_per_s"], "parameters": (run["parameters"] or {}).get("total")}


def point_rows(runs: list[dict], varied: list[str], cells: list[str]) -> list[dict]:
    """A row per combination of the varied fields' values, sorted; runs that share one (the same settings
    trained twice, e.g. on two devices) take a row each, in the order given."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(value_key([run["settings"].get(field) for field in varied]), []).append(run)
    ordered = sorted(groups.values(), key=lambda group: [sort_key(group[0]["settings"].get(f)) for f in varied])
    rows = []
    for group in ordered:
        per_cell = {cell: [run for run in group if run["cell"] == cell] for cell in cells}
        for i in range(max(len(members) for members in per_cell.values())):
            rows.append({"settings": dict(group[0]["settings"]),
                         "cells": {cell: point_entry(members[i]) if i < len(members) else None
                                   for cell, members in per_cell.items()}})
    return rows
