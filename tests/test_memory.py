"""fastlm.memory: freed memory kept in the process, so a step's big buffers are not page-faulted in every step."""

import resource
import sys

import pytest
import torch

from fastlm import memory
from fastlm.device import describe


def _faults_of_a_fresh_64mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MB written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_kept_memory_is_reused_without_page_faults(monkeypatch):
    monkeypatch.delenv(memory.VARIABLE, raising=False)
    assert memory.keep_freed_memory().startswith("glibc keeps freed memory")
    _faults_of_a_fresh_64mb_tensor()  # the first one grows the heap: its pages fault in once
    assert _faults_of_a_fresh_64mb_tensor() < 1000  # glibc's default hands it back: ~16,000 faults each time
    assert describe(torch.device("cpu"))["allocator"] == memory.setting()


def test_the_variable_leaves_the_defaults(monkeypatch):
    monkeypatch.setenv(memory.VARIABLE, "0")
    assert memory.keep_freed_memory() == f"glibc defaults ({memory.VARIABLE}=0)" == memory.setting()
