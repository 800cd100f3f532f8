"""torchrun as `fastlm train --nproc N` starts it: ``python -m fastlm.launch <torchrun's arguments>``.

torchrun itself (``python -m torch.distributed.run``) ends a failed launch with its own report after the
workers' messages: a ~30-line ``ChildFailedError`` traceback when a process failed, a ``SignalException`` one
when the launcher was interrupted, and log lines about the processes it stopped. fastlm's processes have said
what went wrong by then, in their one ``fastlm: error: ...`` line, so this runs torchrun's launch without its
report: the exit status is the first failed process's (128 + N for a process killed by signal N), or 128 + N
when the launcher was stopped by signal N, and nothing else is printed.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's notes about the processes it starts and stops (the workers say what matters themselves).
    for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        code = int(failure.exitcode)
        return code if code > 0 else 128 - code if code < 0 else 1
    except SignalException as error:
        return 128 + int(error.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
