"""`fastlm report`: what a sweep (or any set of run folders) found, with the conditions it was measured under.

``build_report(folders)`` reads sweep folders and run folders and returns the report dict; ``run_report``
also writes it into a folder as ``report.json``, ``report.md`` and ``plots/``. Every figure is derived from
the runs' own config.json and metrics.jsonl, so each one can be checked against the folder it names.

The report dict::

    format, version      "fastlm-report", 1
    sources              the folders given
    sweeps               each sweep's path, grid, budget and quick flag
    conditions           the distinct values of the machine, software and settings, and "notes"
                         (fastlm.report.conditions)
    varied, cells        the fields the runs vary (the sweeps' axes, else found from the configs) and the cells
    runs                 a run's figures each (fastlm.report.collect.run_entry)
    tables               "fields": {field: a row per value, the cells' means side by side},
                         "points": a row per combination of the varied fields (fastlm.report.tables)
    plots                (run_report) the figure files, relative to the report's folder
"""

from __future__ import annotations

import json
from pathlib import Path

from fastlm.report.collect import collect, run_entry, varied_fields
from fastlm.report.conditions import conditions
from fastlm.report.markdown import render
from fastlm.report.tables import field_tables, point_rows, present_cells

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = "plots"


def build_report(folders: list[Path]) -> dict:
    """The report of the runs in ``folders`` (sweep folders and run folders, mixed as given)."""
    sources, sweeps = collect(folders)
    varied = varied_fields(sources, sweeps)
    runs = [run_entry(source, varied) for source in sources]
    cells = present_cells(runs)
    return {"format": "fastlm-report", "version": 1, "sources": [str(folder) for folder in folders],
            "sweeps": [{name: sweep.get(name) for name in ("path", "grid", "budget", "quick")} for sweep in sweeps],
            "conditions": conditions(sources, runs, sweeps, varied), "varied": varied, "cells": cells, "runs": runs,
            "tables": {"fields": field_tables(runs, varied, cells), "points": point_rows(runs, varied, cells)}}


def run_report(folders: list[Path], out: Path) -> dict:
    """Builds the report, writes report.json, report.md and the plots into ``out``; returns the report."""
    from fastlm.report.plots import write_plots  # matplotlib only when figures are drawn

    report = build_report(folders)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [path.relative_to(out).as_posix() for path in write_plots(report, out / PLOTS)]
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(render(report), encoding="utf-8")
    return report
