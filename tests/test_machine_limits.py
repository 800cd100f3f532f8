"""The profile's distance to the machine: work per phase, achieved against peak, the furthest phase, the load check."""

import json

import pytest
import torch

import fastlm.device as device
import fastlm.profile.machine_limits as limits_module
from fastlm.config import RunConfig
from fastlm.profile.machine_limits import furthest_line, limits, phase_work


def example_config(cell="lstm", decoder="full"):
    config = RunConfig()
    config.update({"model": {"cell": cell, "decoder": decoder}}, "test")
    return config.validate().to_dict()


def test_work_per_phase_is_the_examples_arithmetic():
    ran = {"decoder_dtype": "bfloat16", "recurrence_dtype": "float32"}
    work = phase_work(example_config(), 33_278, 1_000_000, ran, "fast")
    tokens = 20 * 35
    assert work["decoder"] == ("gemm", pytest.approx(3 * 2 * tokens * 200 * 33_278 / 1e9), "bfloat16")  # ~28 GFLOP
    # LSTM: 4 gates, two layers of input 200 and hidden 200
    assert work["rnn"] == ("gemm", pytest.approx(2 * 2 * tokens * 4 * 200 * 400 / 1e9), "float32")
    assert work["rnn_grad"][1] == pytest.approx(2 * work["rnn"][1])
    assert work["loss"] == ("memory", pytest.approx(2 * tokens * 33_278 * 2 / 1e9), None)  # bf16 logits
    assert work["optimizer"] == ("memory", pytest.approx(12e-3), None)
    example = phase_work(example_config("gru"), 33_278, 1_000_000, {}, "example")
    assert example["decoder"][1] * 2 == pytest.approx(example["decoder_grad"][1])  # one GEMM forward, two back
    assert example["rnn"][1] == pytest.approx(2 * 2 * tokens * 3 * 200 * 400 / 1e9)  # GRU: 3 gates
    assert "loss" not in phase_work(example_config(decoder="adaptive"), 33_278, 1, {}, "fast")


def breakdown_with(ms: dict) -> dict:
    return {"phases": {"forward": {"mean_ms": sum(ms.values())}, "clip": {"mean_ms": ms.pop("clip", None)}},
            "forward_parts": {name: {"mean_ms": value} for name, value in ms.items()}, "backward_parts": {}}


def test_limits_name_the_phase_with_the_most_time_above_its_peak():
    peaks = {"gemm_float32_gflops": 100.0, "gemm_bfloat16_gflops": 200.0, "copy_gbytes": 10.0}
    work = {"decoder": ("gemm", 20.0, "bfloat16"), "loss": ("memory", 0.1, None), "clip": ("memory", 0.5, None)}
    # decoder: 20 GFLOP at 200 GFLOP/s = 100 ms at peak, took 150 (50 above); loss: 10 ms at peak, took 70
    record = limits(breakdown_with({"decoder": 150.0, "loss": 70.0, "clip": 60.0}), peaks, work)
    assert record["phases"]["decoder"]["fraction"] == pytest.approx(100 / 150)
    assert record["phases"]["loss"]["ms_above_peak"] == pytest.approx(60.0)
    assert record["furthest"] == "loss"
    assert furthest_line(record).startswith("furthest from its limit: loss, 60.0 ms above the machine's copy")
    record = limits(breakdown_with({"decoder": 400.0, "loss": 11.0}), peaks, work)
    assert record["furthest"] == "decoder" and "bfloat16 GEMM peak" in furthest_line(record)
    assert "clip" not in record["phases"]  # not timed: no rate made up


def test_peaks_are_measured_once_per_machine_and_not_kept_when_measured_under_load(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(limits_module, "measure_peaks",
                        lambda dev: calls.append(dev) or {"gemm_float32_gflops": 1.0, "gemm_bfloat16_gflops": 2.0,
                                                          "copy_gbytes": 3.0})
    monkeypatch.setattr(limits_module, "competing_load", lambda threads: "busy")
    assert limits_module.cached_peaks(torch.device("cpu"), tmp_path)["unreliable"] == "busy"
    assert not list(tmp_path.rglob("*.json"))
    monkeypatch.setattr(limits_module, "competing_load", lambda threads: None)
    first = limits_module.cached_peaks(torch.device("cpu"), tmp_path)
    second = limits_module.cached_peaks(torch.device("cpu"), tmp_path)
    assert (first["cached"], second["cached"], len(calls)) == (False, True, 2)
    assert json.loads(next(tmp_path.rglob("*.json")).read_text())["peaks"]["copy_gbytes"] == 3.0


def test_measured_peaks_are_positive_rates():
    peaks = limits_module.measure_peaks(torch.device("cpu"))
    assert all(peaks[k] > 0 for k in ("gemm_float32_gflops", "gemm_bfloat16_gflops", "copy_gbytes"))


def test_the_load_check_counts_the_threads_being_timed(monkeypatch):
    monkeypatch.setattr(device, "machine_load", lambda: (1.2, 2))
    assert device.competing_load(1) is None  # one idle core and a bit of noise: room for it
    assert "load average is 1.2 on 2 cores" in device.competing_load(2)
    monkeypatch.setattr(device, "machine_load", lambda: (0.3, 2))
    assert device.competing_load(2) is None


def test_other_work_leaves_out_this_processes_own_work(monkeypatch):
    """Busy ticks that are this process's own are not other work (the load average would count them)."""
    from fastlm.device import OtherWork

    samples = iter([(1000, 100, 50), (1200, 300, 250)])  # 200 ticks on 2 cores, all 200 busy ones ours
    monkeypatch.setattr(OtherWork, "_sample", staticmethod(lambda: next(samples)))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert OtherWork().cores() == 0.0


def test_other_work_reads_this_machines_proc_files():
    """The real /proc: the machine's ticks and this process's own, which a busy loop moves on."""
    import time

    from fastlm.device import OtherWork

    before = OtherWork._sample()
    if before is None:
        pytest.skip("no /proc/stat here (not Linux)")
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    after = OtherWork._sample()
    assert after[0] > before[0] and after[1] >= before[1] and after[2] > before[2]
    assert all(0 <= busy <= total for total, busy, _ in (before, after))


def test_other_work_is_seen_when_another_process_runs(monkeypatch):
    from fastlm.device import OtherWork

    samples = iter([(1000, 100, 50), (1200, 300, 60)])  # 200 ticks on 2 cores: 190 busy ticks not ours
    monkeypatch.setattr(OtherWork, "_sample", staticmethod(lambda: next(samples)))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert "other processes used 1.9 of 2 cores" in OtherWork().busy()
