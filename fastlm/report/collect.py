"""The runs a report covers, read from the files training left, and each run's figures.

A report is given sweep folders (``sweep.json`` and its points' run folders) and plain run folders (what
``fastlm train`` writes: ``config.json`` and ``metrics.jsonl``). ``collect`` turns them into ``Source``s, the
files of one run as they are; ``run_entry`` derives a run's figures from them. Every figure of a report comes
from here, so that each can be recomputed from the run folder it names. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastlm.errors import FastlmError

SWEEP_JSON = "sweep.json"
FAILED = ("failed", "diverged")  # statuses whose figures are left out of the means
# Config fields that differ between runs without making them different experiments: where a run lives and
# saves, and what it ran on (the conditions say that). The cell is the report's other dimension.
NOT_VARIED = {"cell", "run_dir", "save", "device", "threads", "seed"}  # seeds are replicates, not settings
SECTIONS = ("model", "data", "train")


@dataclass
class Source:
    """One run's files: a sweep's point (``point`` from sweep.json) or a plain run folder (``point`` None)."""

    name: str
    run_dir: Path
    config: Optional[dict]  # config.json; None when the folder or file is missing (a point that failed early)
    records: list  # metrics.jsonl's records, in order
    point: Optional[dict] = None
    sweep: Optional[Path] = None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; FastlmError naming the file when it cannot be read, is not UTF-8 JSON, or
    holds something other than an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise FastlmError(f"cannot read {path}: {reason}") from None
    if not isinstance(value, dict):
        raise FastlmError(f"{path} is not what fastlm writes there (a JSON object, found {type(value).__name__})")
    return value


# The numeric fields of metrics.jsonl's records (README, "What a run leaves"): a record in which one holds
# something else is not one fastlm wrote, and is skipped like a line a crash cut short.
NUMBERS = ("epoch", "step", "batch", "epoch_batches", "loss", "ppl", "lr", "ms_per_batch", "tokens_per_s", "val_loss",
           "val_ppl", "test_loss", "test_ppl", "seconds", "train_seconds", "eval_seconds", "lr_next")


def _well_formed(record) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return False
    if record["kind"] == "epoch" and not _number(record.get("epoch"), int):
        return False
    return all(record.get(name) is None or _number(record[name]) for name in NUMBERS)


def _number(value, kinds=(int, float)) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a missing file is no records, and a line a crash cut short (or that is not a
    record fastlm writes, or not UTF-8) is skipped."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    except OSError as error:
        raise FastlmError(f"cannot read {path}: {error.strerror or error}") from None
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:
            continue
        if _well_formed(record):
            records.append(record)
    return records


def run_folder_source(folder: Path, point: Optional[dict] = None, sweep: Optional[Path] = None) -> Source:
    config_path = folder / "config.json"
    config = read_json(config_path) if config_path.is_file() else None
    if config is not None:
        _check_config(config, config_path)
    name = point["name"] if point else folder.name
    return Source(name, folder, config, read_metrics(folder / "metrics.jsonl"), point, sweep)


def _check_config(config: dict, path: Path) -> None:
    """A named failure for a config.json the report could not read its figures from: the sections are objects,
    the model names its cell (the report's other dimension), and each resume's changes are [before, now] pairs."""
    if not all(isinstance(config.get(section), dict) for section in SECTIONS):
        raise FastlmError(f"{path} is not a fastlm run configuration (it needs model, data and train objects)")
    if not isinstance(config["model"].get("cell"), str):
        raise FastlmError(f"{path} is not a fastlm run configuration (model.cell is missing or not a name)")
    resumes = config.get("resumes", [])
    if not isinstance(resumes, list) or not all(
            isinstance(resume, dict) and isinstance(resume.get("changed", {}), dict)
            and all(isinstance(pair, list) and len(pair) == 2 for pair in resume.get("changed", {}).values())
            for resume in resumes):
        raise FastlmError(f"{path} has a damaged resumes list (each entry an object whose changed settings are "
                          f"[before, now] pairs)")


def sweep_sources(folder: Path) -> tuple[list[Source], dict]:
    """(the sweep's points as sources, sweep.json)."""
    sweep = read_json(folder / SWEEP_JSON)
    points = sweep.get("points")
    if (sweep.get("format") != "fastlm-sweep" or not isinstance(points, list)
            or not all(isinstance(point, dict) and isinstance(point.get("name"), str)
                       and isinstance(point.get("run_dir"), str) and isinstance(point.get("settings", {}), dict)
                       and isinstance(point.get("status", ""), str) for point in points)
            or not isinstance(sweep.get("grid", {}), dict)
            or not isinstance(sweep.get("grid", {}).get("axes", {}), dict)):
        raise FastlmError(f"{folder / SWEEP_JSON} is not a fastlm sweep file (format fastlm-sweep, points with a "
                          f"name and a run_dir each)")
    return [run_folder_source(folder / point["run_dir"], point, folder) for point in sweep["points"]], sweep


def collect(folders: list[Path]) -> tuple[list[Source], list[dict]]:
    """(every run of the folders, the sweeps' sweep.json with their "path"), in the order given."""
    sources, sweeps = [], []
    for folder in map(Path, folders):
        if (folder / SWEEP_JSON).is_file():
            found, sweep = sweep_sources(folder)
            sources += found
            sweeps.append({**sweep, "path": str(folder)})
        elif (folder / "config.json").is_file() and (folder / "metrics.jsonl").is_file():
            sources.append(run_folder_source(folder))
        else:
            raise FastlmError(f"{folder} is neither a sweep folder (with {SWEEP_JSON}) nor a run folder (with "
                              f"config.json and metrics.jsonl)")
    if not sources:
        raise FastlmError(f"no runs to report in {', '.join(map(str, folders)) or 'no folders'}")
    return sources, sweeps


def flat_config(config: Optional[dict]) -> dict:
    """The settings by field name without their section (fields are unique across sections, as sweeps name them)."""
    if not config:
        return {}
    return {name: value for section in SECTIONS for name, value in config.get(section, {}).items()}


def seed_of(source: Source) -> Optional[int]:
    if source.point and source.point.get("seed") is not None:
        return source.point["seed"]
    return flat_config(source.config).get("seed")


def cell_of(source: Source) -> Optional[str]:
    if source.point:
        return source.point.get("cell")
    return flat_config(source.config).get("cell")


def value_key(value) -> str:
    """A value as a comparable, hashable key (lists such as cutoffs included)."""
    return json.dumps(value, sort_keys=True)


def varied_fields(sources: list[Source], sweeps: list[dict]) -> list[str]:
    """The sweeps' axes; with plain run folders among the sources, also every config field whose values differ
    between runs of one cell (a field that only differs from cell to cell is a per-cell setting instead)."""
    fields = [axis for sweep in sweeps for axis in sweep.get("grid", {}).get("axes", {})]
    if any(source.point is None for source in sources):
        values: dict[tuple, set] = {}
        for source in sources:
            for name, value in flat_config(source.config).items():
                values.setdefault((name, cell_of(source)), set()).add(value_key(value))
        fields += [name for (name, _), seen in values.items() if len(seen) > 1 and name not in NOT_VARIED]
    return list(dict.fromkeys(fields))


def planned_epochs(config: dict) -> int:
    """The epochs the run was to train: its --epochs, as the latest resume that raised it left it."""
    train = config.get("train", {})
    epochs = 1 if train.get("dry_run") else train.get("epochs")
    resumes = config.get("resumes", [])
    for resume in resumes if isinstance(resumes, list) else []:
        changed = resume.get("changed", {}) if isinstance(resume, dict) else {}
        change = changed.get("epochs") if isinstance(changed, dict) else None
        if isinstance(change, list) and len(change) == 2:
            epochs = change[1]
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def plain_status(config: dict, records: list[dict]) -> str:
    """done, budget, diverged or interrupted, from what a plain run folder's metrics say."""
    kinds = [record.get("kind") for record in records]
    epochs = [record for record in records if record.get("kind") == "epoch"]
    last_epoch = max((i for i, kind in enumerate(kinds) if kind == "epoch"), default=-1)
    planned = planned_epochs(config)
    if epochs and "test" in kinds[last_epoch:] and planned is not None and epochs[-1]["epoch"] >= planned:
        return "done"
    if kinds and kinds[-1] == "pause":
        return "budget"
    last_resume = max((i for i, kind in enumerate(kinds) if kind == "resume"), default=-1)
    if "diverged" in kinds[last_resume + 1:]:  # a divergence that a later resume got past is history
        return "diverged"
    return "interrupted"


def epoch_rows(records: list[dict]) -> list[dict]:
    """The epoch records' figures in epoch order; an epoch recorded twice (trained again after a crash that came
    before its checkpoint) counts once, as it was last recorded."""
    rows = {}
    for record in records:
        if record.get("kind") == "epoch":
            rows[record["epoch"]] = {name: record.get(name) for name in
                                     ("epoch", "val_ppl", "val_noise", "train_seconds", "eval_seconds", "seconds",
                                      "lr_next", "best")}
    return [rows[epoch] for epoch in sorted(rows)]


def _last(records: list[dict], kind: str) -> Optional[dict]:
    return next((record for record in reversed(records) if record.get("kind") == kind), None)


def _sum(values: list) -> Optional[float]:
    return sum(values) if values else None


def settings_of(source: Source, varied: list[str]) -> dict:
    """The varied fields' values: the point's own from sweep.json, else the run's config."""
    config = flat_config(source.config)
    point = (source.point or {}).get("settings", {})
    return {name: point[name] if name in point else config.get(name) for name in varied}


# A log window whose training loss is this much (nats) above the lowest of the windows before it: a spike (the
# perplexity more than doubled), not the ups and downs of SGD.
SPIKE_NATS = math.log(2.0)


def warning_flags(epochs: list[dict], logs: list[dict]) -> list[str]:
    """Why a run's figures need a second look: validation that rose beyond its noise after an epoch (the same
    test as fastlm.train.lr_rule's noise rule; without a recorded noise, any rise), and training-loss spikes."""
    flags, best = [], None
    for epoch in epochs:
        ppl = epoch["val_ppl"]
        if ppl is None:
            continue
        limit = best * math.exp(epoch.get("val_noise") or 0.0) if best is not None else None
        if limit is not None and ppl > limit:
            flags.append(f"validation perplexity rose at epoch {epoch['epoch']} ({best:,.1f} -> {ppl:,.1f})")
        best = ppl if best is None else min(best, ppl)
    lowest = None
    for log in logs:
        loss = log.get("loss")
        if loss is None or not math.isfinite(loss):
            continue
        if lowest is not None and loss > lowest + SPIKE_NATS:
            flags.append(f"training loss spiked at step {log.get('step')} ({lowest:.2f} -> {loss:.2f} nats)")
            break  # the first spike says it; the rest follow from it
        lowest = loss if lowest is None else min(lowest, loss)
    return flags


def run_entry(source: Source, varied: list[str], where=str) -> dict:
    """A run's figures, each from its config.json and metrics.jsonl (see the README's "What a run leaves");
    ``where`` writes a folder's path as the report names it."""
    records, config = source.records, source.config or {}
    epochs = epoch_rows(records)
    logs = [record for record in records if record.get("kind") == "log"]
    rates = [record["tokens_per_s"] for record in logs if record.get("tokens_per_s") is not None]
    test, pause, diverged = _last(records, "test"), _last(records, "pause"), _last(records, "diverged")
    status = source.point.get("status") if source.point else plain_status(config, records)
    reason = source.point.get("reason") if source.point else None
    if source.point and status not in ("pending", "failed") and not source.run_dir.is_dir():
        status, reason = "failed", f"its run folder {source.run_dir} is missing"  # deleted since: named, not hidden
    elif source.point and status in ("done", "budget") and source.config is None:
        status, reason = "failed", f"its run folder {source.run_dir} has no config.json"
    if reason is None and status in FAILED and diverged:
        reason = diverged.get("message")
    train_seconds = [epoch["train_seconds"] for epoch in epochs if epoch["train_seconds"] is not None]
    val_ppls = [epoch["val_ppl"] for epoch in epochs if epoch["val_ppl"] is not None]
    return {
        "name": source.name, "run_dir": where(source.run_dir), "sweep": where(source.sweep) if source.sweep else None,
        "cell": cell_of(source), "settings": settings_of(source, varied), "seed": seed_of(source),
        "status": status, "reason": reason, "flags": warning_flags(epochs, logs),
        "parameters": config.get("parameters"), "epochs": epochs,
        "best_val_ppl": min(val_ppls) if val_ppls else None,
        "test_ppl": test.get("test_ppl") if test else None,
        "pause": {"val_ppl": pause.get("val_ppl"), "test_ppl": pause.get("test_ppl"), "epoch": pause.get("epoch"),
                  "batch": pause.get("batch"), "step": pause.get("step")} if pause else None,
        "train_seconds": _sum(train_seconds),
        "seconds": _sum([epoch["seconds"] for epoch in epochs if epoch["seconds"] is not None]),
        "seconds_per_epoch": statistics.fmean(train_seconds) if train_seconds else None,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "timing_unreliable": any(record.get("timing_unreliable") for record in logs),
        "max_load": max((record["load"] for record in logs if record.get("load") is not None), default=None),
        "diverged": diverged.get("message") if diverged else None,
    }
