"""Paths the user gives (``--out``, ``--run-dir``, ``--save``, ``--checkpoint``, report folders): the one place
where an operating-system error on one of them becomes the one-line ``fastlm: error: ...``.

``path_error(error, path, flag)`` words an ``OSError`` (a folder where a file should be, a missing parent, a
symbolic-link loop, no permission, a full disk, a write limit) as one line that names the flag, the path and
what to do; ``check_output_file`` refuses an output file that cannot be written before any work is done;
``writing(path, flag)`` wraps a write so that its failure is that line; ``replace_file(path, text)`` writes a
small file atomically (caches of tuned choices). ``fastlm.cli`` turns any other
``OSError`` that reaches it into the same kind of line, so no file problem ends in a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Optional

from fastlm.errors import FastlmError

# What to say for the OS's reasons that a user can do something about.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose another path",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another path",
    errno.EFBIG: "the file would exceed the size limit of this process (ulimit -f) or file system",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EACCES: "permission denied: choose a path you may write",
    errno.EPERM: "operation not permitted: choose a path you may write",
    errno.ELOOP: "it is a symbolic link that leads to itself (a loop): choose another path",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EISDIR: "it is a folder, not a file: name a file",
    errno.ENOTDIR: "a part of it is a file, not a folder",
    errno.ENOENT: "it, or the folder it would be in, does not exist",
    errno.EEXIST: "something else already exists there",
}


def path_error(error: OSError, path, flag: Optional[str] = None, doing: str = "cannot use") -> FastlmError:
    """The one-line FastlmError for ``error`` met while using the user's ``path`` (given by ``flag``)."""
    what = f"{flag} {path}" if flag else str(path)
    reason = _ADVICE.get(error.errno) or (error.strerror or type(error).__name__).lower()
    other = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
    return FastlmError(f"{what}: {doing}{other}: {reason}")


def describe_os_error(error: OSError) -> str:
    """One line for an OSError that reached the command line without a flag to name."""
    reason = _ADVICE.get(error.errno) or (error.strerror or str(error) or type(error).__name__)
    where = error.filename if error.filename is not None else None
    return f"{where}: {reason}" if where is not None else f"{reason}"


def check_output_file(path, flag: str, create_parents: bool = False) -> Path:
    """Refuses, before any work, an output file that cannot be created: a folder, a missing parent folder (made
    instead with ``create_parents``), a parent that is a file, or one that may not be written. Returns the path."""
    path = Path(path)
    if str(path) == "":
        raise FastlmError(f"{flag} is empty: name a file")
    if path.is_dir():
        raise FastlmError(f"{flag} {path}: it is a folder, not a file: name a file")
    parent = path.parent
    if create_parents:
        existing = next((p for p in (parent, *parent.parents) if p.exists() or p.is_symlink()), None)
        if existing is not None and not existing.is_dir():
            raise FastlmError(f"{flag} {path}: {existing} is not a folder")
        with writing(parent, flag, "cannot create"):
            parent.mkdir(parents=True, exist_ok=True)
    if not parent.exists():
        raise FastlmError(f"{flag} {path}: its folder {parent} does not exist: create it first or choose another path")
    if not parent.is_dir():
        raise FastlmError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise FastlmError(f"{flag} {path}: permission denied: choose a path you may write")
    return path


def check_output_folder(path, flag: str) -> Path:
    """Refuses an output folder that is a file, a broken or looping link, or below a file. Returns the path."""
    path = Path(path)
    if str(path) == "":
        raise FastlmError(f"{flag} is empty: name a folder")
    if path.is_symlink() and not path.exists():
        raise FastlmError(f"{flag} {path}: it is a symbolic link that leads nowhere (or in a loop): choose "
                          f"another folder")
    if path.exists() and not path.is_dir():
        raise FastlmError(f"{flag} {path}: it is a file, not a folder: choose another folder")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FastlmError(f"{flag} {path}: {existing} is a file, not a folder")
    return path


@contextlib.contextmanager
def writing(path, flag: Optional[str] = None, doing: str = "cannot write"):
    """``with writing(path, "--out"): ...``: an OSError inside is the one-line error naming ``path``."""
    try:
        yield
    except OSError as error:
        raise path_error(error, path, flag, doing) from None


def replace_file(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file next to ``path`` and renames it into place: readers see the old file
    or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
