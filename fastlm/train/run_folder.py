"""The run folder: everything a run writes, in one place with a stable layout. A folder holds one run.

    <run_dir>/config.json     the full configuration (RunConfig.to_dict()), where the data came from, the
                              machine, and "resumes": what each --resume changed
    <run_dir>/metrics.jsonl   one JSON object per log line, per epoch, per pause or resume, and a test line
    <run_dir>/best.pt         the checkpoint with the best validation loss so far
    <run_dir>/last.pt         the latest state (an epoch end, a pause, a signal, a periodic save)

A new run is refused a folder that already holds a run, unless asked to overwrite it: appending to another
run's metrics, or testing its best.pt, would mix two runs up.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from fastlm.errors import FastlmError
from fastlm.paths import writing


def default_run_dir(config, root: str | Path = "runs") -> Path:
    """Where a run goes without --run-dir: runs/<time>-<cell>-<backend>; a dry run, runs/dry-run-<cell>-<backend>,
    which the next dry run of that cell and backend replaces (holds_a_dry_run): a check that everything runs
    is not worth a folder per try."""
    label = f"{config.model.cell}-{config.model.backend}"
    return Path(root) / f"dry-run-{label}" if config.train.dry_run else unique_run_dir(root, label)


def holds_a_dry_run(path: str | Path) -> bool:
    """``path``'s config.json is a dry run's (a folder whose config.json is missing or damaged is not)."""
    try:
        config = read_config(path)
    except FastlmError:
        return False
    return config is not None and config["train"].get("dry_run") is True


def unique_run_dir(root: str | Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{label}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


RUN_FILES = ("config.json", "metrics.jsonl", "best.pt", "last.pt")


CHECKPOINTS = ("best.pt", "last.pt")


def check_free_for_a_new_run(path: str | Path, overwrite: bool) -> None:
    """Refuses ``path`` when it holds a run, unless ``overwrite``; touches nothing. A run that ended before its
    first checkpoint (nothing to resume) does not hold the folder: a new run replaces its files. (A run still
    going holds the folder's lock, fastlm.train.lock, so it is never taken for such a one.)"""
    path = Path(path)
    held = [name for name in RUN_FILES if (path / name).exists()]
    if held and not overwrite and any(name in held for name in CHECKPOINTS):
        raise FastlmError(f"{path} already holds a run ({', '.join(held)}): continue it with --resume {path}, choose "
                          f"another --run-dir, or pass --overwrite to replace it")


def never_saved(path: str | Path) -> bool:
    """``path`` holds the files of a run that stopped before its first checkpoint."""
    path = Path(path)
    return (path / "config.json").exists() and not any((path / name).exists() for name in CHECKPOINTS)


class RunFolder:
    @classmethod
    def new(cls, path: str | Path, overwrite: bool = False) -> "RunFolder":
        """The folder of a new run: refused if it holds a run, unless ``overwrite``, which deletes that run's
        files (nothing else in the folder)."""
        path = Path(path)
        check_free_for_a_new_run(path, overwrite)
        for name in RUN_FILES:  # another run's (--overwrite), or one's that ended before its first checkpoint
            (path / name).unlink(missing_ok=True)
        folder = cls(path)
        folder.remove_partial_writes()
        return folder

    def remove_partial_writes(self) -> None:
        """Removes the temporary files of checkpoint writes a kill cut short (only ever called by the process that
        holds the folder's lock, so no write is in progress)."""
        for partial in self.path.glob(".*.pt.*.tmp"):
            partial.unlink(missing_ok=True)

    def __init__(self, path: str | Path, create: bool = True):
        """The run folder at ``path``, created if need be; ``create=False`` only names its files (the other
        processes of a distributed run, which write nothing)."""
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.best, self.last = self.path / "best.pt", self.path / "last.pt"
        if not create:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FastlmError(f"cannot create run folder {self.path}: {e.strerror}; "
                              f"choose another with --run-dir") from None
        if not os.access(self.path, os.W_OK):
            raise FastlmError(f"run folder {self.path} is not writable; choose another with --run-dir")
        self.metrics_path.touch()  # there from the start, even for a run that stops before its first log line

    def write_config(self, config: dict) -> None:
        path = self.path / "config.json"
        with writing(path):  # a full disk, a write limit: one line naming the file
            path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def append_metrics(self, record: dict) -> None:
        with writing(self.metrics_path), self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_finite(record), allow_nan=False) + "\n")

    def record_resume(self, record: dict, rebuilt: dict | None = None) -> None:
        """Adds a resume (where it continued, what it changed) to config.json's history and to the metrics;
        ``rebuilt``: config.json's content when the folder lost it (rebuilt from the checkpoint)."""
        config = read_config(self.path) or rebuilt or {}
        if not isinstance(config.get("resumes"), list):
            config["resumes"] = []
        config["resumes"].append({key: value for key, value in record.items() if key != "kind"})
        self.write_config(config)
        self.append_metrics(record)

    def drop_records_after(self, epoch: int, step: int) -> int:
        """Removes from metrics.jsonl what a run wrote after the checkpoint it is resumed from (position ``epoch``,
        ``step``), which the resumed run writes again: log and pause records past ``step``, epoch records of
        ``epoch`` on. History (resume and divergence records) stays. Replaced atomically; returns the count."""
        if not self.metrics_path.is_file():
            return 0
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a kill cut short
            if not isinstance(record, dict):
                continue
            kind, at = record.get("kind"), record.get("step")
            after = isinstance(at, int) and at > step
            if (kind in ("log", "pause", "test") and after) or (kind == "epoch" and isinstance(
                    record.get("epoch"), int) and record["epoch"] >= epoch):
                continue
            kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            partial = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
            partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(partial, self.metrics_path)
        return dropped


def read_records(path: str | Path) -> list[dict]:
    """metrics.jsonl's records: a missing file is none, and a line that is not a JSON object (cut short by a
    kill, or damaged) is skipped, as are bytes that are not UTF-8."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("kind"), str):
            records.append(record)
    return records


def final_test_recorded(path: str | Path, step: int) -> bool:
    """The run in ``path`` recorded the test of its best model at ``step`` (its last checkpoint's)."""
    return any(record["kind"] == "test" and record.get("step") == step
               for record in read_records(Path(path) / "metrics.jsonl"))


def _finite(value):
    """``value`` with every non-finite float (an overflowing perplexity, a NaN loss) as None: metrics.jsonl is
    JSON, which has neither Infinity nor NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


SECTIONS = ("model", "data", "train")


def read_config(path: str | Path) -> dict | None:
    """A run folder's config.json: None when it is missing; FastlmError naming the file when it cannot be read
    or is not what fastlm writes (a JSON object with [model], [data] and [train] objects)."""
    config_path = Path(path) / "config.json"
    try:
        text = config_path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise FastlmError(f"{config_path} is not UTF-8 text: it is damaged; put back the run's own, or remove it "
                          f"and --resume rebuilds it from last.pt") from None
    except OSError as error:
        raise FastlmError(f"cannot read {config_path}: {error.strerror or error}") from None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise FastlmError(f"{config_path} is not valid JSON ({error}): it is damaged; put back the run's own, or "
                          f"remove it and --resume rebuilds it from last.pt") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(section), dict) for section in SECTIONS):
        raise FastlmError(f"{config_path} is not a fastlm run configuration (a JSON object with model, data and "
                          f"train objects); put back the run's own, or remove it and --resume rebuilds it from "
                          f"last.pt")
    return config
