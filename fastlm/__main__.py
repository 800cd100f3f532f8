"""`python -m fastlm` is the same as the `fastlm` console script.

A torchrun worker (`--nproc`, or torchrun itself) ends with ``os._exit`` once its output is flushed: its work is
done and its files are written by then, and on the CPU build of torch a 2-process run's worker sometimes
aborted in the interpreter's teardown ("terminate called without an active exception", exit 134) after
printing its last line, failing a finished run (seen in tests/test_distributed.py under CI, before and after
the house's second pass).
"""

import os
import sys

from fastlm.cli import main

status = main()
# A torchrun worker (fastlm.distributed.launched_by_torchrun's test, read here without importing torch, so
# that --help stays instant).
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
raise SystemExit(status)
