"""Graceful stops: the first SIGINT/SIGTERM asks the trainer to stop after the current step; a second one
ends the process at once.

Ending at once is safe for the files on disk because every checkpoint is written to a temporary file and
renamed into place: an interrupted write leaves the previous ``best``/``last`` intact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Holds the first stop signal received; installs and removes the handlers."""

    def __init__(self, announce=lambda text: print(text, file=sys.stderr, flush=True)):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signum, 1) if self.signum is not None else 0

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as a signal would (also used by tools and tests)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Second signal: leave now. Checkpoints on disk are whole (atomic rename), temp files are ignored.
            sys.stderr.write(f"\nfastlm: second {signal.Signals(signum).name}: exiting at once\n")
            sys.stderr.flush()
            os._exit(EXIT_STATUS.get(signum, 1))
        self.signum = signum
        self.announce(f"fastlm: {signal.Signals(signum).name} received: finishing the current step, saving 'last' "
                      f"and testing the best model (send it again to exit at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_STATUS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False
