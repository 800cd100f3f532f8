"""--device auto takes torch's current accelerator (CUDA, XPU, MPS), else the CPU; the run header says what ran and
which CUDA-only parts are off. The choosing is tested on this CPU by faking torch.accelerator's answer."""

import pytest
import torch

from fastlm.cells import check_runs_on, runs_as
from fastlm.config import RunConfig
from fastlm.device import device_notes, resolve_device
from fastlm.errors import FastlmError
from tests.helpers import run_cli


def fake_accelerator(monkeypatch, kind):
    """torch.accelerator answering as on a machine whose accelerator is ``kind`` (None: none)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: kind is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device(kind) if kind else None)


@pytest.mark.parametrize("kind", ["cuda", "xpu", "mps"])
def test_auto_takes_the_current_accelerator(kind, monkeypatch):
    fake_accelerator(monkeypatch, kind)
    assert resolve_device("auto") == torch.device(kind)
    assert resolve_device(f"{kind}") == torch.device(kind)


def test_auto_without_an_accelerator_is_the_cpu(monkeypatch):
    fake_accelerator(monkeypatch, None)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("present, asked", [(None, "xpu"), (None, "cuda:1"), ("mps", "cuda")])
def test_an_accelerator_the_machine_lacks_is_a_one_line_error(present, asked, monkeypatch):
    fake_accelerator(monkeypatch, present)
    with pytest.raises(FastlmError, match=f"--device {asked} was asked for but .* no {asked.split(':')[0]} device"):
        resolve_device(asked)


def test_the_header_says_how_the_device_was_chosen_and_what_is_off_on_it():
    mps = device_notes(torch.device("mps"), "auto", cuda_graphs=True)
    assert mps[0] == "device: mps (--device auto: torch.accelerator's current accelerator)"
    assert "off on mps (CUDA only): cuDNN" in mps[1] and "CUDA graphs" in mps[1]
    assert "CUDA graphs" not in device_notes(torch.device("xpu"), "xpu", cuda_graphs=False)[1]
    assert device_notes(torch.device("cuda"), "auto", cuda_graphs=True) == [
        "device: cuda (--device auto: torch.accelerator's current accelerator)"]
    assert device_notes(torch.device("cpu"), "auto", cuda_graphs=True) == [
        "device: cpu (--device auto: torch sees no accelerator)"]


def test_backends_on_other_accelerators():
    assert runs_as("cudnn", "mps") == "torch.nn on mps (its own kernels; cuDNN is CUDA's)"
    with pytest.raises(FastlmError, match="--backend triton runs compiled on CUDA or interpreted on the CPU, not on xpu"):
        check_runs_on("triton", "xpu")
    check_runs_on("triton", "cuda")
    check_runs_on("cudnn", "mps")


@pytest.mark.parametrize("device, ok", [("mps", True), ("xpu:1", True), ("cuda:0", True), ("tpu", False),
                                        ("cuda:", False), ("mpsx", False)])
def test_device_names_the_config_takes(device, ok):
    config = RunConfig()
    config.train.device = device
    if ok:
        config.validate()
    else:
        with pytest.raises(FastlmError, match="--device must be auto, cpu, or an accelerator"):
            config.validate()


def test_a_cpu_run_with_the_examples_accel_flag_says_what_ran(tmp_path, monkeypatch):
    fake_accelerator(monkeypatch, None)
    status, out, err = run_cli("train", "--data", "generated", "--dry-run", "--emsize", "8", "--nhid", "8",
                               "--accel", "--run-dir", tmp_path / "run")
    assert status == 0, err
    assert "device: cpu (--device auto: torch sees no accelerator)" in out
