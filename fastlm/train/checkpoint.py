"""Checkpoints: what they hold to continue a run exactly, written atomically, read safely.

A checkpoint is a plain dict of tensors, numbers, strings and lists: beyond the weights, the optimizer state
and learning rate, the position in the data (epoch, batches done), the hidden state carried between
batches, the best validation loss, the RNG states (so dropout masks repeat), the configuration and the
vocabulary (with its digest, to refuse a checkpoint trained on other data). The helpers below put those
pieces into a checkpoint and back; ``Checkpoints`` does it for a trainer, and decides when its run saves.

A checkpoint is loaded with ``torch.load(weights_only=True)`` only: a file that carries a pickled object
(which could run code) is refused, never executed. Writes go to a temporary file in the same folder,
are flushed and fsynced, then renamed over the target, so a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fastlm.cells.math import CELL_MATH
from fastlm.distributed import broadcast_parameters, gather_columns, gather_objects, on_rank_zero
from fastlm.errors import FastlmError, short
from fastlm.model import map_state
from fastlm.step.optimizer import detached_state
from fastlm.step.optimizer import load_state as load_optimizer_state

FORMAT = "fastlm-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Writes ``payload`` to ``path`` atomically (a temporary file renamed into place); FastlmError naming the
    path when it cannot be written (the previous file, if any, is left whole)."""
    path = Path(path)
    try:
        _write_atomically(path, payload)
    except OSError as error:
        raise FastlmError(f"cannot write checkpoint {path}: {error.strerror or error}; free some space or choose "
                          f"another path (the run's own best.pt and last.pt are whole)") from None
    except RuntimeError:  # torch's zip writer words a failed write as an internal assertion: say what happened
        raise FastlmError(f"cannot write checkpoint {path}: {_why_a_write_failed(path)} (the run's own best.pt "
                          f"and last.pt are whole)") from None


def _why_a_write_failed(path: Path) -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return (f"the write stopped, and this process may write files of at most {soft:,} bytes (ulimit -f); "
                f"raise the limit")
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"the disk is full ({free / 2**20:.0f} MiB free); free some space or choose another path"
    return "the write failed; free some space or choose another path"


def check_writable(path: str | Path, flag: str) -> None:
    """FastlmError, before training starts, when a checkpoint could not be written at ``path`` (``flag``'s)."""
    folder = Path(path).parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise FastlmError(f"{flag} {path}: cannot create or write folder {folder}; choose another path")


def _write_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Reads a fastlm checkpoint onto the CPU (``mmap``: tensors mapped from the file, read when used);
    FastlmError for anything that is not one. What it holds is checked by fastlm.train.verify."""
    path = Path(path)
    if not path.is_file():
        raise FastlmError(f"checkpoint {path} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        blocked = _blocked_global(str(e))
        if blocked:  # the weights-only unpickler met a reference to code: refused, never run
            raise FastlmError(f"checkpoint {path} was refused: it holds objects other than plain tensors and "
                              f"values ({blocked}), which could run code when loaded") from None
        raise FastlmError(f"checkpoint {path} is corrupt or not a PyTorch file; point --checkpoint at a best.pt "
                          f"or last.pt of a run") from None
    except OSError as e:
        raise FastlmError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    except Exception as e:  # garbage bytes surface as many error types from the unpickler
        raise FastlmError(f"checkpoint {path} is corrupt or not a PyTorch file "
                          f"({type(e).__name__}); point --checkpoint at a best.pt or last.pt of a run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FastlmError(f"checkpoint {path} is not a fastlm checkpoint; point --checkpoint at a best.pt "
                          f"or last.pt that fastlm train wrote")
    if payload.get("version") != VERSION:
        raise FastlmError(f"checkpoint {path} has format version {payload.get('version')}, this fastlm reads "
                          f"version {VERSION}")
    return payload


def _blocked_global(message: str) -> str | None:
    """The code reference the weights-only unpickler refused (e.g. "GLOBAL posix.system"), if that is why it
    failed (rather than bytes that are not a pickle at all)."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            words = line.split()
            at = next((i for i, w in enumerate(words) if w in ("GLOBAL", "global:")), None)
            return " ".join(words[at:at + 2]) if at is not None else "a global"
    return None


# ---------------------------------------------------------------------------------------------- the pieces

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def hidden_to_save(state):
    """The carried hidden state on the CPU, in its own shape: a tensor, or LSTM's (h, c) tuple."""
    return None if state is None else map_state(lambda s: s.detach().cpu(), state)


def hidden_from_saved(saved, device, cell: str):
    """The saved hidden state on ``device``. Checkpoints written before the state was saved in its own shape
    hold a list ([h], or [h, c] for a cell with a cell state)."""
    if saved is None:
        return None
    if isinstance(saved, list):
        saved = tuple(saved) if CELL_MATH[cell].has_cell_state else saved[0]
    return map_state(lambda s: s.to(device), saved)


def check_vocabulary(payload: dict, corpus, path) -> None:
    if payload.get("vocab_digest") != corpus.vocab.digest():
        raise FastlmError(f"checkpoint {path} was trained on another vocabulary ({len(payload.get('vocab', []))} "
                          f"words, digest {str(payload.get('vocab_digest'))[:12]}) than the data given now "
                          f"({corpus.source}: {len(corpus.vocab)} words, digest {corpus.vocab.digest()[:12]}); "
                          f"pass the same --data as the run used")


def checkpoint_bytes(model: torch.nn.Module, optimizer_copies: int = 0) -> int:
    """About how large one checkpoint of this model is: weights, and ``optimizer_copies`` more of them for the
    optimizer's per-parameter state (AdamW's two moments; SGD keeps none)."""
    return (1 + optimizer_copies) * sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- a run's

class Checkpoints:
    """A trainer's checkpoints: what one holds (``payload``) and continuing from one (``restore``), the last good
    state kept in memory, when ``last`` and ``best`` are saved, whether the run folder has room for them, and the
    best model loaded back for the final test.

    With several processes every rank calls each method at the same point (the payload gathers every rank's
    hidden state and random state; rank 0's clock decides when a save is due), and rank 0 writes."""

    def __init__(self, trainer):
        # The trainer, read at each call: its model, step, run folder and where training stands.
        self.trainer = trainer
        self.good: dict | None = None  # snapshot at the latest log window without a non-finite step
        self._last_save = time.monotonic()

    def payload(self, copy: bool = False) -> dict:
        """The checkpoint of the current state; ``copy`` detaches it from tensors training will update."""
        trainer = self.trainer
        model, optimizer = trainer.model.state_dict(), trainer.step_fn.optimizer.state_dict()
        if copy:  # AdamW's moments too: the optimizer goes on updating them in place
            model = {name: tensor.detach().clone() for name, tensor in model.items()}
            optimizer = detached_state(optimizer)
        hidden = trainer.state
        if trainer.world.size > 1 and hidden is not None:  # the whole batch's state: every rank's columns
            hidden = map_state(lambda s: gather_columns(s, trainer.world), hidden)
        rng = rng_state()
        ranks = {"rng_ranks": gather_objects(rng, trainer.world)} if trainer.world.size > 1 else {}
        return {"model": model, "optimizer": optimizer,
                "config": trainer.config.to_dict(), "vocab": list(trainer.corpus.vocab.idx2word),
                "vocab_digest": trainer.corpus.vocab.digest(), "epoch": trainer.epoch,
                "batches_done": trainer.batches_done, "step": trainer.global_step, "lr": trainer.step_fn.lr,
                "best_val_loss": trainer.best_val_loss, "skipped_batches": trainer.nonfinite.skipped,
                "epoch_train_seconds": trainer.epoch_train_seconds,
                "hidden": hidden_to_save(hidden),
                "rng": rng, **ranks}

    def restore(self, payload: dict, path) -> None:
        """Continue from a checkpoint written by ``payload`` (``--resume``)."""
        trainer = self.trainer
        check_vocabulary(payload, trainer.corpus, path)
        try:
            trainer.model.load_state_dict(payload["model"])
            load_optimizer_state(trainer.step_fn.optimizer, payload["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise FastlmError(f"checkpoint {path} does not fit this model: {short(e)}") from None
        trainer.step_fn.lr = payload["lr"]
        trainer.epoch, trainer.batches_done = payload["epoch"], payload["batches_done"]
        trainer.global_step, trainer.best_val_loss = payload["step"], payload["best_val_loss"]
        trainer.nonfinite.skipped = payload.get("skipped_batches", 0)  # absent before --skip-nonfinite existed
        trainer.epoch_train_seconds = payload.get("epoch_train_seconds", 0.0)
        hidden = hidden_from_saved(payload["hidden"], trainer.device, trainer.config.model.cell)
        share = trainer.world.columns(trainer.config.data.batch_size)
        trainer.state = map_state(lambda s: s[:, share].contiguous(), hidden) if hidden is not None else None
        ranks = payload.get("rng_ranks") or [payload["rng"]]
        if len(ranks) == trainer.world.size:
            set_rng_state(ranks[trainer.world.rank])
        else:  # the batches and weights go on exactly; dropout draws do not
            set_rng_state(ranks[0])
            if trainer.world.rank:
                torch.manual_seed(trainer.config.train.seed + trainer.world.rank + payload["step"])
            trainer.display.message(f"[bold yellow]note: {path} was written by {len(ranks)} process(es) and this "
                                    f"run has {trainer.world.size}: training goes on from the same state, but with "
                                    f"other dropout masks than an uninterrupted run would draw[/]")

    def mark_good(self) -> None:
        """The current state is good (an epoch starts from a validated or restored state; a log window had no
        non-finite step): keep a copy, which ``last`` becomes if training diverges later."""
        self.good = self.payload(copy=True)

    def save_last(self, payload: dict | None = None) -> None:
        """Saves ``last``: ``payload``, or the current state."""
        payload = payload or self.payload()
        on_rank_zero(lambda: save_checkpoint(self.trainer.run.last, payload), self.trainer.world)
        self._last_save = time.monotonic()

    def save_best(self) -> None:
        payload = self.payload()
        on_rank_zero(lambda: save_checkpoint(self.trainer.run.best, payload), self.trainer.world)

    def load_best_model(self) -> None:
        """The run's best model into the trainer's, for its test: rank 0 reads best.pt, every rank gets it."""
        trainer = self.trainer
        if trainer.world.main:
            trainer.model.load_state_dict(load_checkpoint(trainer.run.best)["model"])
        broadcast_parameters(trainer.model, trainer.world)

    def copy_best(self, path) -> None:
        """best.pt, whole, to ``path`` as well (--save)."""
        on_rank_zero(lambda: save_checkpoint(path, load_checkpoint(self.trainer.run.best)), self.trainer.world)

    def save_due(self) -> bool:
        """--save-minutes have passed since the last save: rank 0's clock decides for every rank."""
        minutes = self.trainer.config.train.save_minutes
        return on_rank_zero(lambda: time.monotonic() - self._last_save >= 60 * minutes, self.trainer.world)

    def check_room(self) -> None:
        on_rank_zero(self._check_room_here, self.trainer.world)  # rank 0 writes; every rank hears if it cannot

    def _check_room_here(self) -> None:
        trainer = self.trainer
        # best + last + the temporary file of a write, less the checkpoints already there (a resume replaces them)
        moments = 2 if trainer.config.train.optimizer == "adamw" else 0  # AdamW's exp_avg and exp_avg_sq
        there = sum(path.is_file() for path in (trainer.run.best, trainer.run.last))
        needed = (3 - there) * checkpoint_bytes(trainer.model, moments)
        free = shutil.disk_usage(trainer.run.path).free
        if free < needed:
            raise FastlmError(f"run folder {trainer.run.path} has {free / 2**20:.0f} MiB free but checkpoints "
                              f"need about {needed / 2**20:.0f} MiB; free some space or choose another --run-dir")
