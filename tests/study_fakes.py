"""A sweep folder written by hand: sweep.json and run folders (config.json, metrics.jsonl) whose figures the
test chooses, so that the report's statistics, verdicts and flags can be checked against known numbers
without training anything."""

import json
import math
from pathlib import Path

from fastlm.config import RunConfig


def write_run(folder: Path, cell: str, settings: dict, seed: int, val_ppls: list, train_seconds: list,
              val_noise: float = 0.01, losses: list | None = None) -> None:
    """A finished run: an epoch record per val ppl, log records with ``losses`` (default: falling), a test."""
    config = RunConfig()
    config.model.cell, config.train.seed, config.train.epochs = cell, seed, len(val_ppls)
    for name, value in settings.items():
        section = "data" if name == "bptt" else "model"
        setattr(getattr(config, section), name, value)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        **config.to_dict(), "data_source": "Wikitext-2 from FASTLM_WIKITEXT2=/somewhere/on/this/machine/wikitext-2",
        "parameters": {"total": 1000}, "device": "cpu", "device_name": "test cpu", "threads": 1, "torch": "x",
        "cuda": None, "cudnn": None, "triton": None, "git_sha": "abc", "host": "test"}))
    losses = losses or [7.0 - 0.1 * i for i in range(2 * len(val_ppls))]
    records, step = [], 0
    for epoch, (ppl, seconds) in enumerate(zip(val_ppls, train_seconds), start=1):
        for loss in losses[2 * (epoch - 1):2 * epoch]:
            step += 10
            records.append({"kind": "log", "epoch": epoch, "step": step, "loss": loss, "tokens_per_s": 100.0})
        records.append({"kind": "epoch", "epoch": epoch, "step": step, "val_loss": math.log(ppl), "val_ppl": ppl,
                        "val_noise": val_noise, "seconds": seconds + 1.0, "train_seconds": seconds,
                        "eval_seconds": 1.0, "best": True, "lr_next": 20.0})
    records.append({"kind": "test", "test_loss": math.log(val_ppls[-1]), "test_ppl": val_ppls[-1], "step": step})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def write_study(root: Path, results: dict, baseline: dict, command: str = "fastlm sweep --quick --out study") -> Path:
    """``results``: {(cell, settings as a tuple of (name, value)): [(seed, val_ppls, train_seconds, extra), ...]}."""
    points = []
    for (cell, settings), seeds in results.items():
        settings = dict(settings)
        for seed, val_ppls, train_seconds, extra in seeds:
            name = "-".join([cell, *(f"{n}{v}" for n, v in settings.items()), f"seed{seed}"])
            write_run(root / "points" / name, cell, settings, seed, val_ppls, train_seconds, **extra)
            points.append({"name": name, "cell": cell, "settings": settings, "seed": seed,
                           "run_dir": f"points/{name}", "status": "done", "reason": None, "exit_status": 0})
    axes = {name: sorted({dict(s)[name] for _, s in results}) for name in baseline}
    (root / "sweep.json").write_text(json.dumps({
        "format": "fastlm-sweep", "version": 1, "grid": {"cells": ["lstm", "gru"], "axes": axes, "per_cell": {},
                                                         "design": "ofat", "seeds": [1, 2]},
        "base": {}, "baseline": baseline, "budget": {}, "preset": None, "command": command, "wall_seconds": 600.0,
        "points": points}))
    return root
