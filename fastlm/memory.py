"""Keeping freed memory in the process: glibc's allocator hands every freed block of more than 32 MB (its
largest dynamic mmap threshold) back to the OS, and trims the heap's free top, so a step that allocates and
frees the same tens of MB each time (gradients dropped after the update, the example's [tokens x vocabulary]
tensors) page-faults them in anew every step. Measured on the 2-core development CPU (lstm 2x200, one process,
bench/README.md "Allocator"): 17,000 page faults per bf16 fast step and 105,000 per example step; with freed
memory kept, none, and the steps 15% and 30% shorter.

``keep_freed_memory`` raises both thresholds (mallopt) once per process, on glibc only. Every fastlm command
calls it (fastlm.cli.main), so `fastlm bench` times the example's loop and the fast step under the same
allocator, as they run in `fastlm train`; ``FASTLM_KEEP_FREED_MEMORY=0`` leaves glibc's defaults. ``setting()``
says what is in force, for bench rows and breakdown.json. The cost: the process keeps its peak memory, and a
little more where aligned blocks fragment the heap (a 100-step training run: +2.5% maximum RSS; bench/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

VARIABLE = "FASTLM_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, and are reused when freed
TRIM_THRESHOLD = 1 << 30  # the heap's free top is returned to the OS only beyond 1 GiB (mallopt takes an int)

_setting = "glibc defaults (fastlm.memory.keep_freed_memory not called)"


def keep_freed_memory() -> str:
    """Raises glibc's mmap and trim thresholds (see the module doc); returns ``setting()``."""
    global _setting
    if os.environ.get(VARIABLE, "").strip() == "0":
        _setting = f"glibc defaults ({VARIABLE}=0)"
        return _setting
    if not sys.platform.startswith("linux"):
        _setting = f"the platform's allocator ({sys.platform}: not glibc)"
        return _setting
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                     TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        done = False
    _setting = ("glibc keeps freed memory (mmap and trim thresholds 1 GiB)" if done
                else "the C library's defaults (mallopt unavailable)")
    return _setting


def setting() -> str:
    return _setting
