"""`fastlm report`: what a sweep (or any set of run folders) found, with the conditions it was measured under.

``build_report(folders)`` reads sweep folders and run folders and returns the report dict; ``run_report``
also writes it into a folder as ``report.json``, ``report.md`` and ``plots/``. Every figure is derived from
the runs' own config.json and metrics.jsonl, so each one can be checked against the folder it names.

The report dict::

    format, version      "fastlm-report", 2
    sources              the folders given (relative to the report's folder when written by run_report)
    sweeps               each sweep's path, grid, baseline, budget, preset, command and wall time
    conditions           the distinct values of the machine, software and settings, and "notes"
                         (fastlm.report.conditions)
    varied, cells        the fields the runs vary (the sweeps' axes, else found from the configs) and the cells
    baseline             the settings the study varies one at a time around (None for a full grid)
    runs                 a run's figures each (fastlm.report.collect.run_entry): cell, settings, seed, status,
                         flags, per epoch val_ppl and train_seconds, ...
    groups               per settings, each cell's seeds as spreads and the cells compared
                         (fastlm.report.groups)
    findings             "summary" and per field "fields": sentences from the numbers (fastlm.report.findings)
    tables               "fields": {field: a row per value, the cells' means side by side},
                         "points": a row per combination of the varied fields (fastlm.report.tables)
    plots                (run_report) the figure files, relative to the report's folder
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from fastlm.report.collect import collect, run_entry, value_key, varied_fields
from fastlm.report.conditions import conditions
from fastlm.report.findings import findings
from fastlm.report.groups import point_groups
from fastlm.report.markdown import render
from fastlm.report.tables import field_tables, point_rows, present_cells

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = "plots"
# What the report keeps of each sweep.json: its path (relative to the report), design, budget, preset, the
# command that started it and the wall time its invocations took.
SWEEP_FIELDS = ("path", "grid", "baseline", "budget", "quick", "preset", "command", "wall_seconds", "jobs")


def study_baseline(sweeps: list[dict], varied: list[str]) -> Optional[dict]:
    """The baseline the sweeps vary one field at a time around (one sweep's, or the sweeps' when they agree);
    None without one (a full grid, plain run folders, or sweeps around different baselines)."""
    found = {value_key(sweep.get("baseline")): sweep.get("baseline") for sweep in sweeps}
    if len(found) != 1 or not sweeps:
        return None
    baseline = next(iter(found.values()))
    return baseline if baseline is not None and set(baseline) == set(varied) else None


def build_report(folders: list[Path], out: Optional[Path] = None) -> dict:
    """The report of the runs in ``folders`` (sweep folders and run folders, mixed as given); with ``out``, every
    path in it is relative to that folder (a report that moves with its runs names no machine's paths)."""
    def where(path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), Path(out).resolve())).as_posix() if out else str(path)

    sources, sweeps = collect(folders)
    sweeps = [{**sweep, "path": where(sweep["path"])} for sweep in sweeps]
    varied = varied_fields(sources, sweeps)
    runs = [run_entry(source, varied, where) for source in sources]
    cells = present_cells(runs)
    baseline = study_baseline(sweeps, varied)
    groups = point_groups(runs, varied, cells)
    report = {"format": "fastlm-report", "version": 2, "sources": [where(folder) for folder in folders],
              "sweeps": [{name: sweep.get(name) for name in SWEEP_FIELDS} for sweep in sweeps],
              "conditions": conditions(sources, runs, sweeps, varied), "varied": varied, "cells": cells,
              "baseline": baseline, "runs": runs, "groups": groups,
              "tables": {"fields": field_tables(runs, varied, cells, baseline),
                         "points": point_rows(runs, varied, cells)}}
    report["findings"] = findings(report, groups, baseline)
    return report


def run_report(folders: list[Path], out: Path) -> dict:
    """Builds the report, writes report.json, report.md and the plots into ``out``; returns the report."""
    from fastlm.report.plots import write_plots  # matplotlib only when figures are drawn

    out = Path(out)
    report = build_report(folders, out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [path.relative_to(out).as_posix() for path in write_plots(report, out / PLOTS)]
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(render(report), encoding="utf-8")
    return report
