"""`fastlm train` from a configuration: data, model, run folder, training, test; or `--resume RUN_DIR`.

On resume the run's own configuration (from its ``last.pt``) is the base. Flags may change how long and
where it runs, and where the data lives; a flag that would change the model or the batches is refused,
naming the checkpoint's value and the flag's.
"""

from __future__ import annotations

from pathlib import Path

from fastlm.config import RunConfig
from fastlm.data import resolve_corpus
from fastlm.device import resolve_device
from fastlm.errors import FastlmError
from fastlm.train.checkpoint import load_checkpoint
from fastlm.train.progress import TrainDisplay
from fastlm.train.run_folder import RunFolder, unique_run_dir
from fastlm.train.trainer import Trainer

RESUME_MAY_CHANGE = {
    ("data", "data"), ("train", "epochs"), ("train", "max_steps"), ("train", "max_minutes"),
    ("train", "log_interval"), ("train", "device"), ("train", "save"), ("train", "save_minutes"),
    ("train", "run_dir"), ("train", "skip_nonfinite"),
}


def resume_config(run_dir: Path, overrides: dict) -> tuple[RunConfig, dict]:
    """(config to continue with, the last.pt payload) for ``--resume run_dir`` with these flag overrides."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        raise FastlmError(f"cannot resume {run_dir}: it has no last.pt (is it a fastlm run folder?)")
    payload = load_checkpoint(last)
    config = RunConfig.from_dict(payload["config"], origin=f"checkpoint {last}")
    saved = config.to_dict()
    for section, values in overrides.items():
        for name, value in values.items():
            if (section, name) not in RESUME_MAY_CHANGE and saved[section][name] != value:
                flag = "--" + name.replace("_", "-")
                raise FastlmError(f"{flag} {value} differs from the run being resumed ({run_dir} was trained with "
                                  f"{saved[section][name]}); drop the flag or start a new run")
    config.update(overrides, origin="command line")
    config.train.run_dir = str(run_dir)
    return config.validate(), payload


def run_training(config: RunConfig, resume_dir: str | None = None, overrides: dict | None = None) -> int:
    """Runs `fastlm train`; returns the exit status (0, or 130/143 after SIGINT/SIGTERM)."""
    payload = None
    if resume_dir is not None:
        config, payload = resume_config(Path(resume_dir), overrides or {})
    device = resolve_device(config.train.device)
    display = TrainDisplay()
    corpus = resolve_corpus(config.data.data, console=display.console)
    trainer = Trainer(config, corpus, device, display)
    if payload is not None:
        trainer.restore(payload, Path(resume_dir) / "last.pt")
    m = config.model
    run = RunFolder(config.train.run_dir or unique_run_dir("runs", f"{m.cell}-{m.backend}"))
    if payload is None:
        run.write_config({**config.to_dict(), "data_source": corpus.source, "vocab_size": len(corpus.vocab),
                          "device": str(device)})
    where = (f"resuming epoch {trainer.epoch} after {trainer.batches_done} batches (step {trainer.global_step})"
             if payload is not None else f"run folder {run.path}")
    display.message(f"fastlm train | {m.cell} {m.nlayers}x{m.nhid} on {m.backend} | {device} | "
                    f"{corpus.source} ({len(corpus.vocab):,} words) | {where}")
    with display:
        result = trainer.fit(run)
    display.message(f"run folder: {run.path}")
    return result.exit_status
