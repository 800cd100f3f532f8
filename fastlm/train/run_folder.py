"""The run folder: everything a run writes, in one place with a stable layout.

    <run_dir>/config.json     the full configuration (RunConfig.to_dict()) plus where the data came from
    <run_dir>/metrics.jsonl   one JSON object per log line, per epoch and a final test line
    <run_dir>/best.pt         the checkpoint with the best validation loss so far
    <run_dir>/last.pt         the checkpoint at the end of the latest epoch (or at an interrupt)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fastlm.errors import FastlmError


def unique_run_dir(root: str | Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{label}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FastlmError(f"cannot create run folder {self.path}: {e.strerror}; "
                              f"choose another with --run-dir") from None
        if not os.access(self.path, os.W_OK):
            raise FastlmError(f"run folder {self.path} is not writable; choose another with --run-dir")
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.touch()  # there from the start, even for a run that stops before its first log line
        self.best = self.path / "best.pt"
        self.last = self.path / "last.pt"

    def write_config(self, config: dict) -> None:
        (self.path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def append_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
