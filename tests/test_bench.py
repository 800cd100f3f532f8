"""`fastlm bench`: the matrix it plans, the JSON lines it writes, its timing helpers and the GPU check script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm.benchmark.cases import COMPILE_BF16, EXAMPLE, Case, StepSettings, build_step_call, step_config, zipf_tokens
from fastlm.benchmark.command import BenchOptions, plan
from fastlm.benchmark.measure import PeakMemory, Timing, time_calls
from fastlm.config import RunConfig
from fastlm.device import describe
from fastlm.step.example import ExampleStep
from fastlm.step.fast import TrainStep
from tests.helpers import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
# What a result says about the machine is fastlm.device.describe's fields, the same as in breakdown.json.
REQUIRED = ("suite", "cell", "backend", "mode", "T", "B", "E", "H", "V", "precision", *describe("cpu"),
            "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "peak_mem_mb", "recurrence_dtype")
# A step row also says what its decoder ran in, both TF32 switches and what became of CUDA graphs.
STEP_REQUIRED = ("decoder_dtype", "matmul_tf32", "cudnn_tf32", "cuda_graphs_requested", "cuda_graph_replays")


def fastlm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastlm", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_a_small_bench_writes_one_json_line_per_case_with_speedups(tmp_path):
    out = tmp_path / "results.jsonl"
    result = fastlm("bench", "--cell", "gru", "--backend", "reference,cudnn", "--shape", "4,3,8,8", "--vocab", 40,
                    "--repeat", 2, "--warmup", 1, "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["backend"]) for r in records] == [
        ("fwd", "cudnn"), ("fwd", "reference"), ("fwdbwd", "cudnn"), ("fwdbwd", "reference"),
        ("step", EXAMPLE), ("step", "reference"), ("step", "cudnn")]
    for r in records:
        assert all(key in r for key in REQUIRED), set(REQUIRED) - set(r)
        assert r["recurrence_dtype"] == "float32"
        if r["suite"] == "step":
            assert all(key in r for key in STEP_REQUIRED), set(STEP_REQUIRED) - set(r)
            assert r["decoder_dtype"] == "float32" and not r["matmul_tf32"] and not r["cudnn_tf32"]
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["tokens_per_s"] > 0
        assert r["baseline"] == ("cudnn" if r["suite"] == "cells" else EXAMPLE)
        assert abs(r["speedup"] - r_baseline_ms(records, r) / r["median_ms"]) < 1e-9
    assert {r["V"] for r in records if r["suite"] == "step"} == {40}
    assert "speedup" in result.stdout and "baseline" in result.stdout


def r_baseline_ms(records, r):
    return next(b["median_ms"] for b in records if b["mode"] == r["mode"] and b["backend"] == r["baseline"])


def test_plan_puts_the_baseline_first_and_leaves_interpreted_triton_out_on_cpu():
    options = BenchOptions(cells=["lstm"], modes=["fwdbwd", "step"], shapes=[(5, 2, 4, 4)],
                           precisions=["fp32", "tf32", "bf16"], launches=["eager", "graph"])
    groups, notes = plan(options, torch.device("cpu"))
    cells_groups = [g for g in groups if g[0].mode == "fwdbwd"]
    # one group per precision and launch, the baseline in the same precision and launch as the others
    assert [g[0].backend for g in cells_groups] == ["cudnn"] * 6
    assert all(len({(c.precision, c.launch) for c in g}) == 1 for g in cells_groups)
    step = next(g for g in groups if g[0].mode == "step")
    assert step[0] == Case("step", "lstm", EXAMPLE, 5, 2, 4, 4, "fp32")  # the example as it is: fp32
    assert step[1] == Case("step", "lstm", COMPILE_BF16, 5, 2, 4, 4, "bf16")  # bf16 timed: its compiled twin too
    assert {c.precision for c in step[1:]} == {"fp32", "tf32", "bf16"}
    assert all(c.backend not in ("triton", "compile") for g in groups for c in g)
    assert any("triton" in n for n in notes) and any("compile" in n for n in notes)


def test_variants_multiply_only_the_backends_that_have_them():
    options = BenchOptions(cells=["gru"], backends=["cudnn", "triton"], modes=["fwd", "step"], shapes=[(3, 2, 4, 4)],
                           variants=["per-step", "persistent"])
    groups, _ = plan(options, torch.device("cpu"))
    cells_group = next(g for g in groups if g[0].mode == "fwd")
    assert [(c.backend, c.variant) for c in cells_group] == [("cudnn", "auto"), ("triton", "per-step"),
                                                              ("triton", "persistent")]
    step_group = next(g for g in groups if g[0].mode == "step")
    assert [(c.backend, c.variant) for c in step_group] == [(EXAMPLE, "auto"), ("cudnn", "auto"),
                                                             ("triton", "per-step"), ("triton", "persistent")]


def test_default_shapes_are_the_examples_on_cuda_and_leave_1500_out_on_cpu():
    options = BenchOptions(cells=["gru"], backends=["cudnn"], modes=["fwd"])
    assert [g[0].H for g in plan(options, torch.device("cuda"))[0]] == [200, 650, 1500]
    groups, notes = plan(options, torch.device("cpu"))
    assert [g[0].H for g in groups] == [200, 650] and any("1500" in n for n in notes)


@pytest.mark.parametrize("args, words", [
    (("--mode", "fast"), "--mode"),
    (("--precision", "fp8"), "--precision"),
    (("--variant", "fused"), "--variant"),
    (("--launch", "graph", "--device", "cpu"), "--launch graph"),
    (("--launch", "lazy"), "--launch"),
    (("--backend", "example", "--mode", "fwd"), "example"),
    (("--shape", "1,2,3"), "T,B,E,H"),
    (("--tied", "--shape", "5,2,4,8", "--mode", "step"), "--tied"),
    (("--dropout", "1.5"), "--dropout"),
    (("--layers", "0"), "--nlayers"),
])
def test_bad_arguments_are_one_line_errors(args, words):
    status, _, err = run_cli("bench", "--device", "cpu", *args)
    assert words in one_line_error(status, err)


def test_a_failing_case_is_recorded_and_the_matrix_goes_on(tmp_path):
    out = tmp_path / "r.jsonl"
    # 'compile' has no rnn_tanh cell: that case fails, the others still run.
    result = fastlm("bench", "--cell", "rnn_tanh", "--backend", "cudnn,compile", "--mode", "fwd", "--shape",
                    "3,2,4,4", "--repeat", 1, "--device", "cpu", "--out", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.returncode == 1
    assert "error" not in records[0] and "compile" in records[1]["error"]


def step_settings(**model) -> StepSettings:
    base = RunConfig()
    base.update({"model": model}, origin="test")
    return StepSettings(base=base.validate(), vocab=30)


def test_a_step_case_is_built_from_a_validated_run_configuration():
    """Bench builds its step as training does: the base configuration with the case's cell, backend, sizes and
    precision, through make_train_step, so lr and clip are the training defaults, not numbers of its own."""
    settings = step_settings(nlayers=3, dropout=0.1)
    config = step_config(Case("step", "gru", "script", 5, 4, 8, 8, "bf16"), settings, torch.device("cpu"))
    assert (config.model.cell, config.model.backend, config.model.nlayers, config.model.dropout) == ("gru", "script",
                                                                                                     3, 0.1)
    assert (config.data.bptt, config.data.batch_size, config.model.emsize, config.train.precision) == (5, 4, 8,
                                                                                                      "bf16")
    call = build_step_call(Case("step", "gru", "script", 5, 4, 8, 8, "fp32"), settings, torch.device("cpu"))
    assert isinstance(call.step, TrainStep) and (call.step.lr, call.step.clip) == (RunConfig().train.lr, 0.25)
    example = step_config(Case("step", "lstm", EXAMPLE, 5, 4, 8, 8, "fp32"), step_settings(decoder="adaptive"),
                          torch.device("cpu"))
    assert (example.train.step, example.model.backend, example.model.decoder) == ("example", "cudnn", "full")


def test_step_call_carries_the_hidden_state_from_step_to_step():
    case = Case("step", "lstm", "reference", 3, 2, 8, 8, "fp32")
    call = build_step_call(case, step_settings(tied=True), torch.device("cpu"))
    given, step = [], call.step
    call.step = lambda inputs, targets, state, timer: step(inputs, targets, given.append(state) or state, timer)
    returned = []
    for _ in range(3):
        call()
        returned.append(call.state)
    assert all(torch.count_nonzero(h) == 0 for h in given[0])  # the first step starts from zeros
    # then each step gets the state the one before it returned
    assert all(g is r for g, r in zip(given[1:], returned[:2], strict=True))
    assert all(torch.count_nonzero(h) > 0 for h in returned[-1])


def test_bf16_step_and_cells_rows_say_they_ran_in_bf16(tmp_path):
    out = tmp_path / "bf16.jsonl"
    result = fastlm("bench", "--cell", "lstm", "--backend", "reference", "--mode", "fwdbwd,step", "--shape", "4,3,8,8",
                    "--vocab", 40, "--repeat", 1, "--warmup", 0, "--device", "cpu", "--precision", "bf16,tf32",
                    "--no-compile-baseline", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = {(r["mode"], r["backend"], r["precision"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["fwdbwd", "reference", "bf16"]["recurrence_dtype"] == "bfloat16"
    assert rows["fwdbwd", "reference", "tf32"]["recurrence_dtype"] == "float32"
    step = rows["step", "reference", "bf16"]
    assert (step["recurrence_dtype"], step["decoder_dtype"]) == ("float32", "bfloat16")
    example = rows["step", EXAMPLE, "fp32"]  # the baseline stays exact fp32
    assert (example["recurrence_dtype"], example["matmul_tf32"], example["cudnn_tf32"]) == ("float32", False, False)
    tf32 = rows["step", "reference", "tf32"]
    assert tf32["matmul_tf32"] and tf32["cudnn_tf32"]  # the switches as they stood while the case ran


def test_a_case_puts_the_tf32_switches_back():
    from fastlm.benchmark.command import run_case
    from fastlm.precision import tf32_flags

    before = tf32_flags()
    case = Case("fwd", "gru", "reference", 3, 2, 4, 4, "tf32")
    row = run_case(case, BenchOptions(), torch.device("cpu"), repeat=1, warmup=0)
    assert row["recurrence_dtype"] == "float32" and row["matmul_tf32"] and row["cudnn_tf32"]
    assert tf32_flags() == before


def test_example_step_call_runs_the_examples_step():
    example = build_step_call(Case("step", "gru", EXAMPLE, 3, 2, 8, 8, "fp32"), step_settings(),
                              torch.device("cpu"))
    example()
    assert isinstance(example.step, ExampleStep) and example.step.total_loss > 0
    assert torch.count_nonzero(example.state) > 0


def test_zipf_tokens_follow_frequency_order():
    ids = zipf_tokens(1000, 50_000, torch.device("cpu"))
    counts = torch.bincount(ids, minlength=1000)
    assert ids.min() >= 0 and ids.max() < 1000
    assert counts[0] > counts[10] > counts[500]  # P(k) ~ 1/(k+1)


def test_timing_percentiles_and_time_calls():
    timing = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert timing.median_ms == 3.0 and timing.percentile_ms(20) == 1.8 and timing.percentile_ms(80) == 4.2
    calls = []
    measured = time_calls(lambda: calls.append(1), repeat=4, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 6 and len(measured.samples_ms) == 4


@pytest.mark.perf
def test_cpu_peak_memory_sees_a_transient_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if peak.mb is None:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert 48 <= peak.mb <= 200


@pytest.mark.slow
def test_the_compiled_bf16_example_is_a_second_baseline(tmp_path):
    """--precision bf16 adds the example under torch.compile + bf16 autocast; fast rows say their ratio to it."""
    out = tmp_path / "compiled.jsonl"
    result = fastlm("bench", "--cell", "gru", "--backend", "cudnn", "--mode", "step", "--shape", "4,3,8,8",
                    "--vocab", 40, "--repeat", 1, "--warmup", 1, "--device", "cpu", "--precision", "bf16",
                    "--out", out)
    assert result.returncode == 0, result.stderr
    rows = {r["backend"]: r for r in map(json.loads, out.read_text().splitlines())}
    compiled, fast = rows[COMPILE_BF16], rows["cudnn"]
    assert compiled["decoder_dtype"] == "bfloat16" and compiled["baseline"] == EXAMPLE
    assert fast["vs_compile_bf16"] == pytest.approx(compiled["median_ms"] / fast["median_ms"])
    assert "vs_compile_bf16" not in rows[EXAMPLE]
