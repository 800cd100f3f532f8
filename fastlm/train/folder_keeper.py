"""The run folder's keeper: the one process that writes a run folder, and what it does for the others.

One process, or rank 0 of a torchrun launch, keeps the folder: it takes the folder's lock before anything reads
it and holds it until the run ends, and it does the folder's work while the run is set up. The other ranks
learn the folder's path from it, and the outcome of each step or its error (fastlm.distributed.on_rank_zero),
at the same points. This is the one place where `fastlm train` threads rank 0's work through the ranks.
Without --run-dir the keeper picks the folder (run_folder.default_run_dir); a dry run there replaces the
previous dry run's folder as if --overwrite were given, and nothing else.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from fastlm.config import RunConfig
from fastlm.distributed import SINGLE, World, launched_by_torchrun, on_rank_zero
from fastlm.train.checkpoint import check_writable
from fastlm.train.lock import FolderLock
from fastlm.train.progress import TrainDisplay
from fastlm.train.run_folder import (
    RunFolder,
    check_free_for_a_new_run,
    default_run_dir,
    holds_a_dry_run,
    read_config,
)


class FolderKeeper:
    def __init__(self, config: Optional[RunConfig], resume_dir: Optional[str], overwrite: bool):
        """Run before joining the other processes (torchrun's environment says which process keeps the folder);
        ``config`` is None on a resume, whose folder is ``resume_dir``; ``overwrite``: a new run may replace the
        run its folder holds (--overwrite)."""
        self.world = SINGLE  # until ``share``
        self.path = None  # the keeper's alone until ``share``
        self.overwrite = overwrite  # the keeper's alone: only the keeper checks and creates the folder
        self._lock = None
        if _keeps_the_run_folder():
            self.path = resume_dir or config.train.run_dir or default_run_dir(config)
            self._lock = FolderLock(self.path).acquire()
            if resume_dir is None and not config.train.run_dir and config.train.dry_run:
                self.overwrite = overwrite or holds_a_dry_run(self.path)  # the last dry run's: replaced, not piled up

    def __enter__(self) -> "FolderKeeper":
        return self

    def __exit__(self, *exc) -> bool:
        if self._lock is not None:
            self._lock.release()
        return False

    def share(self, world: World) -> None:
        """After joining: every rank learns the folder's path."""
        self.world = world
        held = self.path
        self.path = on_rank_zero(lambda: str(held), world)

    def check_before_loading(self, new_run: bool, save: Optional[str]) -> None:
        """What can be refused at once, before the corpus loads: a new run's folder that holds another run (unless
        it may be overwritten), a --save path that cannot be written."""
        if new_run:
            on_rank_zero(lambda: check_free_for_a_new_run(self.path, self.overwrite), self.world)
        if save:
            on_rank_zero(lambda: check_writable(save, "--save"), self.world)

    def create(self, description: Callable[[], dict]) -> RunFolder:
        """A new run's folder, with config.json holding ``description()`` (computed by the keeper alone)."""
        on_rank_zero(lambda: RunFolder.new(self.path, self.overwrite).write_config(description()), self.world)
        return RunFolder(self.path, create=self.world.main)

    def continue_run(self, checkpoint: dict, resume: dict, description: Callable[[], dict],
                     display: TrainDisplay) -> RunFolder:
        """A resumed run's folder, made ready to be written from the checkpoint's position on: ``resume`` (the
        "resume" record) added to its history; config.json, if lost, rebuilt from ``description()``."""
        run = RunFolder(self.path, create=self.world.main)
        if self.world.main:
            rebuilt = None
            if read_config(self.path) is None:  # lost: rebuilt from last.pt and this machine, as a new run writes it
                rebuilt = {**description(), "rebuilt_from": "last.pt"}
                display.message(f"[bold yellow]{self.path}/config.json was missing: rebuilt from last.pt[/]")
            run.remove_partial_writes()  # this process holds the folder: a temporary file is a killed write's
            # What the run wrote after last.pt (before a kill) is written again from here on: no duplicates.
            run.drop_records_after(checkpoint["epoch"], checkpoint["step"])
            run.record_resume(resume, rebuilt=rebuilt)
        return run


def _keeps_the_run_folder() -> bool:
    """One process, or rank 0 of a torchrun launch (read from torchrun's environment, before joining)."""
    return not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0
