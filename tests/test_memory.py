"""fastlm.memory: the allocator setting every fastlm command applies, and where it is recorded.

Its effect (no page faults per step) is measured, not tested: bench/README.md, "Allocator"."""

import os
import subprocess
import sys

import pytest
import torch

from fastlm import memory
from fastlm.device import describe

SETTING_OF_A_FRESH_PROCESS = "from fastlm import memory; print(memory.keep_freed_memory())"


def _setting(variable: str) -> str:
    env = {**os.environ, memory.VARIABLE: variable}
    return subprocess.run([sys.executable, "-c", SETTING_OF_A_FRESH_PROCESS], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_glibc_takes_the_thresholds_unless_told_not_to():
    assert _setting("1") == "glibc keeps freed memory (mmap and trim thresholds 1 GiB)"  # both mallopt calls took
    assert _setting("0") == f"glibc defaults ({memory.VARIABLE}=0)"


def test_the_setting_is_recorded_where_results_are(monkeypatch):
    monkeypatch.setattr(memory, "_setting", "a setting")
    assert describe(torch.device("cpu"))["allocator"] == "a setting"
