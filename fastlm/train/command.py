"""`fastlm train` from a configuration: data, model, run folder, training, test; or `--resume RUN_DIR`.

On resume the run's own configuration (from its ``last.pt``) is the base. Flags may change how long and
where it runs, where the data lives, and the lr and clipping norm (what one lowers after a divergence); a
flag that would change the model or the batches is refused, naming the checkpoint's value and the flag's.
What a resume changed is recorded in config.json ("resumes") and metrics.jsonl (a "resume" record).
A new run is refused a folder that already holds a run, unless ``--overwrite``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from rich.console import Console

from fastlm.cells import runs_as
from fastlm.config import RunConfig
from fastlm.data import resolve_corpus
from fastlm.device import describe, device_notes, resolve_device, use_threads
from fastlm.distributed import SINGLE, collective_errors, first_on_each_machine, join, launched_by_torchrun, leave
from fastlm.errors import FastlmError
from fastlm.step import precision_line
from fastlm.step.optimizer import describe as describe_optimizer
from fastlm.train.folder_keeper import FolderKeeper
from fastlm.train.onnx_export import check_exportable, export_run
from fastlm.train.progress import TrainDisplay
from fastlm.train.run_folder import RunFolder, final_test_recorded, never_saved, read_config
from fastlm.train.trainer import Trainer
from fastlm.train.verify import check_matches, check_resumable, open_checkpoint

RESUME_MAY_CHANGE = {
    ("data", "data"), ("data", "data_mode"), ("train", "epochs"), ("train", "max_steps"), ("train", "max_minutes"),
    ("train", "log_interval"), ("train", "device"), ("train", "save"), ("train", "save_minutes"),
    ("train", "run_dir"), ("train", "skip_nonfinite"), ("train", "threads"),
    ("train", "dist_timeout"),
    # (--eval-batches is not among them: it decides what the validation loss measures, and so which model is
    # the best so far.)
    # What people lower after a divergence: the lr training continues with (the schedule goes on dividing
    # it) and the clipping norm. Recorded in the run's history.
    ("train", "lr"), ("train", "clip"),
}
# A budget belongs to one invocation: a resumed run takes --max-steps/--max-minutes from its own command line.
BUDGETS = ("max_steps", "max_minutes")


def resume_config(run_dir: Path, overrides: dict) -> tuple[RunConfig, dict, dict]:
    """(config to continue with, the last.pt payload, {setting: [before, now]} the flags changed) for
    ``--resume run_dir`` with these flag overrides."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        if never_saved(run_dir):
            raise FastlmError(f"cannot resume {run_dir}: its run stopped before its first checkpoint, so there is "
                              f"nothing to continue; start it again with its flags and --run-dir {run_dir}")
        raise FastlmError(f"cannot resume {run_dir}: it has no last.pt (is it a fastlm run folder?)")
    checked = open_checkpoint(last)  # a valid configuration, vocabulary and weights (fastlm.train.verify)
    check_resumable(checked)
    _check_the_folder_agrees(Path(run_dir), checked)
    payload, config = checked.payload, checked.config
    saved = config.to_dict()
    saved["train"]["lr"] = payload["lr"]  # the lr training stands at, after the schedule's divisions
    for section, values in overrides.items():
        for name, value in values.items():
            if (section, name) not in RESUME_MAY_CHANGE and saved[section][name] != value:
                flag = "--" + name.replace("_", "-")
                raise FastlmError(f"{flag} {value} differs from the run being resumed ({run_dir} was trained with "
                                  f"{saved[section][name]}); drop the flag or start a new run")
    other = overrides.get("train", {}).get("run_dir")
    if other is not None and os.path.abspath(other) != os.path.abspath(run_dir):
        raise FastlmError(f"--resume {run_dir} continues the run in its own folder, and --run-dir {other} names "
                          f"another: drop --run-dir (to continue the run elsewhere, copy its folder and resume the "
                          f"copy)")
    for name in BUDGETS:
        setattr(config.train, name, None)
    config.update(overrides, origin="command line")
    config.train.run_dir = str(run_dir)
    config.validate()
    if not _only_the_test_is_missing(config, payload, run_dir):
        _check_budgets_leave_work(config, payload, run_dir)
    changed = {name: [saved["train"][name], value] for name, value in overrides.get("train", {}).items()
               if name not in ("run_dir", *BUDGETS) and saved["train"][name] != value}
    # Model flags that differ were refused above; the data's place may move.
    changed.update({f"data.{name}": [saved["data"][name], value] for name, value in overrides.get("data", {}).items()
                    if saved["data"][name] != value})
    return config, payload, changed


def _check_the_folder_agrees(run_dir: Path, checked) -> None:
    """last.pt must be the run's own: of the model and batches config.json describes (a last.pt copied in from
    another run is refused), and best.pt, when there is one, of the same model and vocabulary."""
    folder = read_config(run_dir)  # None when missing (rebuilt from last.pt); damaged: a one-line refusal
    if folder is not None:
        try:
            described = RunConfig.from_dict({name: folder[name] for name in ("model", "data", "train")},
                                            origin=f"{run_dir / 'config.json'}")
        except FastlmError as error:
            raise FastlmError(f"{error}; put back the run's own config.json, or remove it and --resume rebuilds it "
                              f"from last.pt") from None
        check_matches(checked, described, f"the run's {run_dir / 'config.json'}", may_differ=RESUME_MAY_CHANGE)
        size = folder.get("vocab_size")
        if isinstance(size, int) and size != len(checked.vocab):
            raise FastlmError(f"checkpoint {checked.path} has {len(checked.vocab):,} words but "
                              f"{run_dir / 'config.json'} "
                              f"says the run's vocabulary has {size:,}: it comes from another run")
    best = run_dir / "best.pt"
    if best.is_file():
        other = open_checkpoint(best, mmap=True)
        check_matches(other, checked.config, f"the run's {checked.path}", may_differ=RESUME_MAY_CHANGE)
        if other.payload.get("vocab_digest") != checked.payload.get("vocab_digest"):
            raise FastlmError(f"checkpoint {best} was trained on another vocabulary than {checked.path}: it comes "
                              f"from another run")


def _only_the_test_is_missing(config: RunConfig, payload: dict, run_dir: Path) -> bool:
    """The run trained all its epochs but was killed before it tested its best model (its metrics hold no test
    record at its last step): resuming it finishes that, and trains nothing."""
    done_epochs = payload["epoch"] - 1
    planned = 1 if config.train.dry_run else config.train.epochs
    return done_epochs == planned and payload["batches_done"] == 0 and not final_test_recorded(run_dir, payload["step"])


def _check_budgets_leave_work(config: RunConfig, payload: dict, run_dir: Path) -> None:
    """A resume whose --epochs or --max-steps is already reached would do nothing: say so instead."""
    done_epochs, steps = payload["epoch"] - 1, payload["step"]
    if config.train.epochs <= done_epochs:
        tested = " and tested its best model" if final_test_recorded(run_dir, steps) else ""
        raise FastlmError(f"{run_dir} has finished {done_epochs} epoch(s){tested}, so --epochs {config.train.epochs} "
                          f"leaves nothing to train; give --epochs {done_epochs + 1} or more")
    if config.train.max_steps is not None and config.train.max_steps <= steps:
        raise FastlmError(f"{run_dir} has done {steps} steps, so --max-steps {config.train.max_steps} leaves nothing "
                          f"to train; give --max-steps {steps + 1} or more (it counts all steps), or none")


def run_training(config: RunConfig, resume_dir: str | None = None, overrides: dict | None = None,
                 overwrite: bool = False, onnx_export: str | None = None) -> int:
    """Runs `fastlm train`, in one process or as one rank of a torchrun launch (fastlm.distributed); returns
    the exit status (0, or 130/143 after SIGINT/SIGTERM). ``onnx_export``: also write the run's best model there
    as ONNX at the end (fastlm.train.onnx_export)."""
    payload = changed = None
    if resume_dir is not None and not Path(resume_dir).is_dir():
        raise FastlmError(f"cannot resume {resume_dir}: there is no such folder")
    # One writer per run folder: the process that writes it (rank 0 of several) holds its lock from before it
    # reads anything in it until the run ends.
    with FolderKeeper(config, resume_dir, overwrite) as keeper:
        if resume_dir is not None:  # every rank reads the run's last.pt: the run folder must be on a shared disk
            config, payload, changed = resume_config(Path(resume_dir), overrides or {})
        world, device_choice = SINGLE, config.train.device
        if launched_by_torchrun():
            world, device_choice = join(device_choice, config.train.dist_timeout)
        try:
            with collective_errors(world):
                keeper.share(world)
                return _train(config, world, device_choice, keeper, resume_dir, payload, changed, onnx_export)
        finally:
            leave()


def _train(config, world, device_choice, keeper, resume_dir, payload, changed, onnx_export) -> int:
    keeper.check_before_loading(payload is None, config.train.save)  # before the corpus loads: at once
    if onnx_export is not None:  # said before training, not after it
        check_exportable(config.model)
    device = resolve_device(device_choice)
    use_threads(config.train.threads)
    # One progress display and one log: rank 0's. The others keep theirs in memory.
    display = TrainDisplay() if world.main else TrainDisplay(Console(file=io.StringIO()))
    corpus = first_on_each_machine(
        lambda: resolve_corpus(config.data.data, console=display.console, mode=config.data.data_mode), world)
    trainer = Trainer(config, corpus, device, display, world=world)
    counts = trainer.model.parameter_counts()
    if payload is None:
        run = keeper.create(lambda: {
            **_facts(trainer, counts),
            "optimizer_ran": describe_optimizer(trainer.step_fn.optimizer, trainer.step_fn.plain_sgd),
            **describe(device)})
        where = f"run folder {run.path}"
        if config.train.dry_run and not config.train.run_dir:
            where += " (the dry runs' folder: the next one replaces it)"
    else:
        trainer.restore(payload, Path(resume_dir) / "last.pt")
        if "lr" in changed:  # the lr training continues with, instead of the one it stood at
            trainer.step_fn.lr = config.train.lr
        resume = {"kind": "resume", "epoch": trainer.epoch, "batch": trainer.batches_done,
                  "step": trainer.global_step, "changed": changed, "processes": world.size}
        run = keeper.continue_run(payload, resume, lambda: {**_facts(trainer, counts), **describe(device)}, display)
        where = (f"resuming epoch {trainer.epoch} after {trainer.batches_done} batches (step {trainer.global_step})"
                 + "".join(f" | {name} {old} -> {new}" for name, (old, new) in changed.items()))
    _print_header(trainer, device_choice, counts, where)
    with display:
        result = trainer.fit(run)
    if onnx_export is not None and world.main:
        _export_best(run, onnx_export, display)
    display.message(f"run folder: {run.path}")
    return result.exit_status


def _facts(trainer: Trainer, counts: dict) -> dict:
    """What config.json holds besides the configuration: the data the run read, its model's size, its processes."""
    corpus = trainer.corpus
    return {**trainer.config.to_dict(), "data_source": corpus.source, "vocab_size": len(corpus.vocab),
            "data_mode_used": corpus.mode, "parameters": counts, "processes": trainer.world.size}


def _print_header(trainer: Trainer, device_choice: str, counts: dict, where: str) -> None:
    display, device, corpus, m = trainer.display, trainer.device, trainer.corpus, trainer.config.model
    for note in device_notes(device, device_choice, trainer.config.train.cuda_graphs):
        display.message(note)
    processes = f" x {trainer.world.size} processes" if trainer.world.size > 1 else ""
    display.message(f"fastlm train | {m.cell} {m.nlayers}x{m.nhid} | {m.backend}: {runs_as(m.backend, device.type)} | "
                    f"{device}{processes} | {corpus.source} ({len(corpus.vocab):,} words, {corpus.mode}) | {where}")
    display.message(optimizer_line(trainer.step_fn))
    display.message(f"parameters: {counts['total']:,} (embedding {counts['embedding']:,}, recurrent "
                    f"{counts['recurrent']:,}, decoder {counts['decoder']:,}"
                    f"{', its weight tied to the embedding' if m.tied else ''})")
    display.message(precision_line(trainer.step_fn))


def _export_best(run: RunFolder, onnx_export: str, display: TrainDisplay) -> None:
    if run.best.is_file():
        export_run(run.path, onnx_export)
        display.message(f"best model exported to {onnx_export} (ONNX)")
    else:
        display.message("no best model yet (no epoch finished its validation): nothing exported to ONNX")


def optimizer_line(step_fn) -> str:
    """The run header's line on the update: the optimizer and its kernels, and the lr schedule it follows."""
    ran = describe_optimizer(step_fn.optimizer, step_fn.plain_sgd)
    betas = f", betas {ran['betas'][0]:g},{ran['betas'][1]:g}" if "betas" in ran else ""
    return (f"optimizer: {ran['optimizer']} ({ran['optimizer_impl']}), lr {step_fn.lr:g}, weight decay "
            f"{ran['weight_decay']:g}{betas} | lr /= 4 after each epoch whose validation does not improve")
