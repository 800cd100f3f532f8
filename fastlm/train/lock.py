"""One writer per run folder: a lock that a second `fastlm train` (or `--resume`, or sweep) on the same folder is
refused by, with a line naming the process that holds it.

The lock is ``<folder>/.fastlm.lock``, held with ``flock`` on an open descriptor: the kernel lets go of it when
the process ends, however it ends (SIGKILL, a crash, a lost machine's NFS lease), so a lock left by a dead
process never blocks the folder. The file also says who holds it (process id, host, command, since when), for
the refusal's message; a file whose lock nobody holds is stale and is taken over. On a file system without
``flock`` the process id alone decides: a holder on this host that is no longer alive does not block.

With several processes (torchrun) rank 0 holds the lock for the whole run; the other ranks write nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from fastlm.errors import FastlmError
from fastlm.paths import path_error

LOCK_NAME = ".fastlm.lock"


class FolderLock:
    """The lock of one folder, held from ``acquire()`` until ``release()`` (or the process's end)."""

    def __init__(self, folder: str | Path, what: str = "run folder", flag: str = "--run-dir"):
        self.folder, self.what, self.flag = Path(folder), what, flag
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created: list[Path] = []  # folders this lock created (removed again if the run leaves them empty)

    # ----------------------------------------------------------------------------------------------- taking it
    def acquire(self) -> "FolderLock":
        self._make_folder()
        try:
            while True:
                fd = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as error:
                    os.close(fd)
                    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise FastlmError(self._held_message(read_holder(self.path))) from None
                    if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        fd = self._without_flock()
                    else:
                        raise path_error(error, self.path, self.flag) from None
                # Another process may have released and removed the file between our open and our lock: then we
                # hold a lock on a name nobody else sees, and must take the file that is there now.
                if self._still_ours(fd):
                    break
                os.close(fd)
            self._fd = fd
            self._write_holder()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _make_folder(self) -> None:
        if self.folder.is_symlink() and not self.folder.exists():
            raise FastlmError(f"{self.flag} {self.folder} is a symbolic link that leads nowhere (or in a loop); "
                              f"choose another folder")
        if self.folder.exists() and not self.folder.is_dir():
            raise FastlmError(f"{self.flag} {self.folder} is a file, not a folder; choose another {self.flag}")
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise path_error(error, self.folder, self.flag, "cannot create") from None
        self._created = [p for p in missing if p.is_dir()]

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise path_error(error, self.folder, self.flag, "cannot write in") from None

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _without_flock(self) -> int:
        """No flock here (some network file systems): the holder's process id decides."""
        holder = read_holder(self.path)
        if holder and holder.get("pid") != os.getpid() and _alive(holder):
            raise FastlmError(self._held_message(holder))
        return self._open()

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(["fastlm", *sys.argv[1:]])[:300]}
        data = (json.dumps(holder) + "\n").encode("utf-8")
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # the lock holds without its note; a refusal then names no process

    def _held_message(self, holder: Optional[dict]) -> str:
        if holder:
            where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
            who = (f"process {holder.get('pid')}{where} ({holder.get('command', 'fastlm')}, since "
                   f"{holder.get('since', '?')})")
        else:
            who = "another process"
        return (f"{self.what} {self.folder} is in use by {who}: one process at a time writes a {self.what}; wait "
                f"for it to end, or choose another {self.flag}")

    # --------------------------------------------------------------------------------------------- letting go
    def release(self) -> None:
        """Lets go of the lock (removing the file while still holding it), and removes the folders ``acquire``
        created if nothing was written into them (a run refused before it began leaves nothing behind)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def read_holder(path: Path) -> Optional[dict]:
    """What a lock file says of its holder, or None (no file, or nothing readable in it)."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def holder_of(folder: str | Path) -> Optional[dict]:
    """The holder of ``folder``'s lock when a live process holds it, else None (touches nothing)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return read_holder(path) or {}
        holder = read_holder(path)
        return holder if holder and _alive(holder) else None
    finally:
        os.close(fd)
    return None


def _alive(holder: dict) -> bool:
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: we cannot tell, so it counts as alive
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
