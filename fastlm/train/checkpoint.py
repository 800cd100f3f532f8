"""Checkpoints: plain dicts of tensors, numbers, strings and lists, written atomically, read safely.

A checkpoint is loaded with ``torch.load(weights_only=True)`` only: a file that carries a pickled object
(which could run code) is refused, never executed. Writes go to a temporary file in the same folder,
are flushed and fsynced, then renamed over the target, so a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from fastlm.errors import FastlmError, first_line

FORMAT = "fastlm-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> None:
    path = Path(path)
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


def load_checkpoint(path: str | Path) -> dict:
    """Reads a fastlm checkpoint onto the CPU; FastlmError for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FastlmError(f"checkpoint {path} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FastlmError(f"checkpoint {path} was refused: it holds objects other than plain tensors and "
                          f"values, which could run code when loaded ({first_line(e)[:160]})") from None
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
