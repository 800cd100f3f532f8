"""What a report's numbers were measured under, so that none is quoted without it.

``conditions`` gathers, over the runs, the distinct values of the machine and software (device, threads,
versions, commit, host) and of the settings every figure depends on (backend, precision, step, seed, data,
epoch length, evaluation length, batch sizes, lr), and writes ``notes``: sentences on what makes the numbers
differ from a plain full-length run (short epochs, partial evaluation, budgets, resumes, busy machines) and
on the runs that diverged, failed or did not finish.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from fastlm.report.collect import FAILED, NOT_VARIED, Source, flat_config, planned_epochs, value_key

MACHINE = ("device", "device_name", "threads", "torch", "cuda", "cudnn", "triton", "git_sha", "host")
SETTINGS = ("backend", "precision", "step", "decoder", "seed", "data_source", "epochs", "steps_per_epoch",
            "eval_batches", "batch_size", "eval_batch_size", "lr_rule")
INCOMPLETE = ("pending", "running", "interrupted")


def distinct(values) -> list:
    """The values without repeats, in the order first seen."""
    seen = {}
    for value in values:
        seen.setdefault(value_key(value), value)
    return list(seen.values())


def without_paths(text):
    """A description with each absolute path cut to its last part: a report names no folder of the machine it
    was made on ("Wikitext-2 from FASTLM_WIKITEXT2=wikitext-2")."""
    if not isinstance(text, str):
        return text
    return re.sub(r"(?<![\w.])/[^\s,;:()'\"]+", lambda match: PurePosixPath(match.group()).name or "/", text)


def setting(source: Source, name: str):
    """One condition of a run, from its config.json."""
    if name == "data_source":
        return without_paths(source.config.get(name))
    if name in MACHINE:
        return source.config.get(name)
    if name == "epochs":
        return planned_epochs(source.config)
    return flat_config(source.config).get(name)


def lr_condition(configured: list[Source]):
    """The lr values: one list when every cell has the same ones, else a list per cell."""
    overall = distinct(setting(source, "lr") for source in configured)
    per_cell = {}
    for source in configured:
        per_cell.setdefault(flat_config(source.config).get("cell"), []).append(setting(source, "lr"))
    per_cell = {cell: distinct(values) for cell, values in per_cell.items()}
    return overall if all(values == overall for values in per_cell.values()) else per_cell


def _which(names: list[str], total: int) -> str:
    """" (runs a, b)" when a note holds for only some of the runs, else nothing."""
    return "" if len(names) == total else f" (runs {', '.join(names)})"


def _by_value(configured: list[Source], name: str) -> dict:
    """{value key: (value, names of the runs with it)} of one setting."""
    groups: dict = {}
    for source in configured:
        value = setting(source, name)
        groups.setdefault(value_key(value), (value, []))[1].append(source.name)
    return groups


def length_notes(configured: list[Source]) -> list[str]:
    """Short epochs, partial evaluation and per-run budgets of the runs' own configs."""
    notes, total = [], len(configured)
    shortened = (  # (setting, what a value means, what no value means where other runs have one)
        ("steps_per_epoch", "epochs of {v} batches (--steps-per-epoch {v}), not full passes over the training split",
         "epochs are full passes over the training split"),
        ("eval_batches", "validation and test on the first {v} batches of each split (--eval-batches {v})",
         "validation and test on the whole splits"),
    )
    for name, shortened_text, whole_text in shortened:
        groups = _by_value(configured, name)
        for value, names in groups.values():
            if value is not None:
                notes.append(shortened_text.format(v=value) + _which(names, total))
            elif len(groups) > 1:
                notes.append(whole_text + _which(names, total))
    plain = [source for source in configured if source.point is None]  # a sweep's budget is in sweep.json
    for value, names in _by_value(plain, "max_steps").values():
        if value is not None:
            notes.append(f"budget: at most {value} steps per run (--max-steps {value}){_which(names, total)}")
    for value, names in _by_value(plain, "max_minutes").values():
        if value is not None:
            notes.append(f"budget: at most {value:g} minutes per run (--max-minutes {value:g}){_which(names, total)}")
    return notes


def sweep_notes(sweeps: list[dict]) -> list[str]:
    notes = []
    for sweep in sweeps:
        # The budget the points ran under (each point keeps its own; older sweep files only the sweep's).
        ran_under = [point.get("budget") for point in sweep.get("points", []) if point.get("budget")]
        budget, where = (ran_under[-1] if ran_under else sweep.get("budget")) or {}, sweep["path"]
        if budget.get("max_minutes_per_run"):
            notes.append(f"budget: at most {budget['max_minutes_per_run']:g} minutes of training per run "
                         f"(sweep {where})")
        if budget.get("max_steps"):
            notes.append(f"budget: at most {budget['max_steps']} steps per run (sweep {where})")
        if sweep.get("jobs", 1) > 1:
            notes.append(f"sweep {where} trained up to {sweep['jobs']} points at once: each point's training time "
                         f"was measured with the others running beside it")
        if sweep.get("preset"):
            notes.append(f"sweep {where} ran the --{sweep['preset']['name']} preset: {sweep['preset']['why']}")
        elif sweep.get("quick"):  # a sweep file written before the presets
            notes.append(f"sweep {where} ran with --quick: a small grid of short epochs that finishes in minutes, "
                         f"not a full-length comparison")
    return notes


def machine_notes(configured: list[Source], varied: list[str]) -> list[str]:
    notes = []
    if len(distinct(setting(s, "device_name") for s in configured)) > 1 or \
            len(distinct(setting(s, "host") for s in configured)) > 1:
        notes.append("the runs were measured on more than one machine or device: compare timings only between "
                     "runs measured on the same one")
    if any(str(setting(source, "git_sha")).endswith("-dirty") for source in configured):
        notes.append("the code had uncommitted changes when some runs started (a git_sha ending in -dirty)")
    for field, per_cell in per_cell_settings(configured, varied).items():
        notes.append(f"{field} differs by cell: " + ", ".join(f"{cell} {value}" for cell, value in per_cell.items()))
    for source in configured:
        resumes = source.config.get("resumes", [])
        changes = [f"{name} {before} -> {now}" for resume in resumes
                   for name, (before, now) in resume.get("changed", {}).items()]
        if resumes:
            notes.append(f"{source.name} was resumed {len(resumes)} time(s)"
                         + (f", changing {', '.join(changes)}" if changes else ""))
    return notes


def per_cell_settings(configured: list[Source], varied: list[str]) -> dict:
    """{field: {cell: value}} of the settings (lr aside, which the conditions show per cell) that are one value
    within each cell but differ between cells."""
    by_field: dict = {}
    for source in configured:
        config = flat_config(source.config)
        for name, value in config.items():
            if name not in NOT_VARIED and name not in varied and name != "lr":
                by_field.setdefault(name, {}).setdefault(config.get("cell"), []).append(value)
    found = {}
    for name, per_cell in by_field.items():
        values = {cell: distinct(seen) for cell, seen in per_cell.items()}
        if all(len(v) == 1 for v in values.values()) and len(distinct(v[0] for v in values.values())) > 1:
            found[name] = {cell: v[0] for cell, v in values.items()}
    return found


def run_notes(runs: list[dict]) -> list[str]:
    """Busy machines, budgets, divergences, failures and unfinished runs, each naming its runs."""
    notes = []
    unreliable = [run["name"] for run in runs if run["timing_unreliable"]]
    if unreliable:
        notes.append(f"timings of these runs are unreliable: other work loaded the machine's cores besides the runs' "
                     f"own threads: {', '.join(unreliable)}")
    paused = [run["name"] for run in runs if run["status"] == "budget"]
    if paused:
        notes.append(f"paused by their budget (figures up to the pause, where the pause record measured the "
                     f"current weights; no best model tested yet): {', '.join(paused)}")
    for run in runs:
        if run["status"] in FAILED:
            notes.append(f"{run['name']} {run['status']}: {run['reason'] or 'no reason recorded'}")
        elif run["diverged"]:
            notes.append(f"{run['name']} diverged and was resumed: {run['diverged']}")
    incomplete = [f"{run['name']} ({run['status']})" for run in runs if run["status"] in INCOMPLETE]
    if incomplete:
        notes.append(f"without complete results: {', '.join(incomplete)}")
    return notes


def conditions(sources: list[Source], runs: list[dict], sweeps: list[dict], varied: list[str]) -> dict:
    """The distinct values of each condition over the runs that have a config.json, and the notes."""
    configured = [source for source in sources if source.config]
    found = {name: distinct(setting(source, name) for source in configured) for name in (*MACHINE, *SETTINGS)}
    found["lr"] = lr_condition(configured)
    found["notes"] = (length_notes(configured) + sweep_notes(sweeps) + machine_notes(configured, varied)
                      + run_notes(runs))
    return found
