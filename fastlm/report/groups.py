"""A study's points: the runs that share a cell and settings (its seeds), their mean and spread, and each pair
of cells compared at every settings (fastlm.report.replicates judges the differences).

``point_groups`` gives a row per combination of the varied fields' values that the runs have, in order; in
each, per cell, the seeds' best validation perplexity, total training seconds and validation perplexity after
each epoch as spreads, the runs flagged (fastlm.report.collect.warning_flags) and those left out as failed; and
per pair of cells (the first cell against each other, e.g. LSTM against GRU), the differences with their
verdict. Failed and diverged runs are left out of the spreads and counted.
"""

from __future__ import annotations

from itertools import combinations

from fastlm.report.collect import FAILED, value_key
from fastlm.report.replicates import compare, spread
from fastlm.report.tables import at_baseline, field_values, sort_key


def cell_group(runs: list[dict]) -> dict:
    kept = [run for run in runs if run["status"] not in FAILED and run["epochs"]]
    longest = max((len(run["epochs"]) for run in kept), default=0)
    return {"runs": [run["name"] for run in runs], "seeds": [run["seed"] for run in kept],
            "failed": [run["name"] for run in runs if run["status"] in FAILED],
            "flagged": [run["name"] for run in kept if run["flags"]],
            "best_val_ppl": spread([run["best_val_ppl"] for run in kept]),
            "train_seconds": spread([run["train_seconds"] for run in kept]),
            "curve": [spread([run["epochs"][i]["val_ppl"] for run in kept if len(run["epochs"]) > i])
                      for i in range(longest)]}


def comparisons(cells: dict) -> list[dict]:
    """Each pair of the cells with results here (in the report's order), the second against the first."""
    present = [cell for cell, group in cells.items() if group["best_val_ppl"]]
    return [{"cells": [a, b], "val_ppl": compare(cells[a]["best_val_ppl"], cells[b]["best_val_ppl"]),
             "train_seconds": compare(cells[a]["train_seconds"], cells[b]["train_seconds"])}
            for a, b in combinations(present, 2)]


def point_groups(runs: list[dict], varied: list[str], cells: list[str]) -> list[dict]:
    by_settings: dict = {}
    for run in runs:
        by_settings.setdefault(value_key([run["settings"].get(field) for field in varied]), []).append(run)
    ordered = sorted(by_settings.values(), key=lambda group: [sort_key(group[0]["settings"].get(f)) for f in varied])
    rows = []
    for members in ordered:
        per_cell = {cell: cell_group([run for run in members if run["cell"] == cell]) for cell in cells}
        rows.append({"settings": dict(members[0]["settings"]), "cells": per_cell, "comparisons": comparisons(per_cell)})
    return rows


def find_group(groups: list[dict], settings: dict) -> dict | None:
    """The group of exactly these settings, or None."""
    key = value_key(settings)
    return next((group for group in groups if value_key(group["settings"]) == key), None)


def field_groups(runs: list[dict], field: str, cells: list[str], baseline: dict | None) -> list[dict]:
    """A row per value of ``field`` over the runs whose other fields are at the baseline (without a baseline:
    all runs with that value), each with its cells' groups and the cells compared."""
    runs = [run for run in runs if at_baseline(run, baseline, field)]
    rows = []
    for value in field_values(runs, field):
        matching = [run for run in runs if value_key(run["settings"].get(field)) == value_key(value)]
        per_cell = {cell: cell_group([run for run in matching if run["cell"] == cell]) for cell in cells}
        rows.append({"value": value, "cells": per_cell, "comparisons": comparisons(per_cell)})
    return rows
