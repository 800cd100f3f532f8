"""`fastlm profile` end to end: its files, its traces, py-spy and nsys re-runs, and its errors."""

import gzip
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from fastlm import cli
from fastlm.device import describe
from fastlm.profile import external_profilers
from fastlm.timing import BACKWARD_PARTS, FORWARD_PARTS, PHASES, STEP
from tests.helpers import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--data", "generated", "--emsize", 32, "--nhid", 32, "--batch-size", 8, "--bptt", 12, "--device", "cpu")


def fastlm(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastlm", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile")
    result = fastlm("profile", *TINY, "--warmup", 2, "--steps", 5, "--trace-steps", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "share of step" in result.stdout and "one-off costs" in result.stdout
    return out


def test_breakdown_json_has_the_documented_fields(profiled):
    data = json.loads((profiled / "breakdown.json").read_text())
    assert data["steps"] == 5 and data["step_ms"]["n"] == 5
    assert data["step_ms"]["mean"] > 0 and data["step_ms"]["median"] > 0
    for section, names in (("phases", PHASES), ("forward_parts", FORWARD_PARTS)):
        for name in names:
            entry = data[section][name]
            assert entry["mean_ms"] > 0 and entry["median_ms"] > 0 and 0 < entry["share"] < 1, (name, entry)
    total = sum(entry["share"] for entry in data["phases"].values())
    assert total == pytest.approx(data["coverage"])
    assert data["tokens_per_s"] == pytest.approx(8 * 12 / (data["step_ms"]["mean"] / 1e3))
    for name in ("corpus_load", "trainer_setup", "batchify", "first_h2d_copy", "first_step"):
        assert data["one_off_ms"][name] >= 0, name
    assert data["config"]["model"]["emsize"] == 32 and data["device"] == "cpu"
    ran = data["ran"]  # what the step really ran in, beside the precision asked for
    assert (ran["precision"], ran["recurrence_dtype"], ran["decoder_dtype"]) == ("fp32", "float32", "float32")
    assert ran["matmul_tf32"] is False and ran["cudnn_tf32"] is False and ran["cuda_graph_replays"] == 0
    assert "recurrence in float32" in (profiled / "breakdown.md").read_text()
    assert {key: data[key] for key in describe("cpu")} == describe("cpu")  # the one machine description
    table = (profiled / "breakdown.md").read_text()
    assert "| backward |" in table and "| step (measured wall) |" in table


def test_the_picture_is_written(profiled):
    svg = ET.parse(profiled / "flow.svg").getroot()
    assert svg.tag.endswith("svg")
    assert (profiled / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_torch_trace_is_valid_and_names_every_phase(profiled):
    with gzip.open(profiled / "trace.json.gz", "rt", encoding="utf-8") as f:
        trace = json.load(f)
    assert trace["distributedInfo"]["rank"] == 0  # what Holistic Trace Analysis keys traces by
    events = trace["traceEvents"]
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    names = {e["name"] for e in ranges}
    assert {STEP, *PHASES, *FORWARD_PARTS} <= names
    assert sum(e["name"] == STEP for e in ranges) == 2  # --trace-steps 2
    assert sum(str(e.get("name", "")).startswith("ProfilerStep#") for e in events) >= 2
    assert all(e["dur"] >= 0 and "ts" in e for e in ranges)


@pytest.mark.slow
def test_py_spy_mode_writes_speedscope_and_flame_graph(tmp_path):
    if external_profilers.find_tool("py-spy") is None:
        pytest.fail("py-spy is a dependency of fastlm and should be installed")
    out = tmp_path / "spy"
    result = fastlm("profile", *TINY, "--warmup", 1, "--steps", 3, "--trace-steps", 0, "--out", out, "--py-spy")
    assert result.returncode == 0, result.stderr
    speedscope = json.loads((out / "py-spy.speedscope.json").read_text())
    assert speedscope["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    assert speedscope["profiles"] and any(p["samples"] for p in speedscope["profiles"])
    files = {frame.get("file", "") for frame in speedscope["shared"]["frames"]}
    assert any(name.endswith(os.path.join("fastlm", "profile", "command.py")) for name in files)
    assert ET.parse(out / "py-spy-flamegraph.svg").getroot().tag.endswith("svg")
    assert (out / "breakdown.json").is_file() and not (out / "trace.json.gz").exists()


def fake_tool(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def test_py_spy_without_permission_is_a_clean_error(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "py-spy", 'echo "Error: Permission Denied (os error 13)" >&2; exit 1')
    result = fastlm("profile", *TINY, "--out", tmp_path / "out", "--py-spy",
                    env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    relayed, error = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Permission Denied" in relayed  # py-spy's own words, passed on
    assert error.startswith("fastlm: error: py-spy lacks permission")


def call_without_tools(monkeypatch, capsys, tmp_path, *args):
    """Runs the CLI in-process with no tool reachable: empty PATH, an interpreter folder without tools."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setattr(external_profilers, "NSYS_PLACES", ())
    status = cli.main(["profile", *map(str, TINY), "--out", str(tmp_path / "out"), *map(str, args)])
    return status, one_line_error(status, capsys.readouterr().err)


def test_missing_py_spy_is_a_clean_error(monkeypatch, capsys, tmp_path):
    status, line = call_without_tools(monkeypatch, capsys, tmp_path, "--py-spy")
    assert status == 2 and "pip install py-spy" in line


def test_missing_nsys_prints_the_exact_command(monkeypatch, capsys, tmp_path):
    status, line = call_without_tools(monkeypatch, capsys, tmp_path, "--nsys", "--steps", 7)
    assert status == 2 and "Nsight Systems" in line
    out = tmp_path / "out"
    command = line.split("run: ", 1)[1]
    for piece in ("nsys profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop", "nvtx",
                  f"--output={out / 'nsys'}", "-m fastlm profile", f"--config {out / 'profile-config.toml'}",
                  "--steps 7", f"--out {out}"):
        assert piece in command, piece
    args = cli.build_parser().parse_args(["profile", "--config", str(out / "profile-config.toml")])
    written = cli.config_from_args(args)
    assert written.model.emsize == 32 and written.data.data == "generated"  # the command runs what was asked


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_nsys_on_cpu_says_it_needs_cuda(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "nsys", "exit 0")
    result = fastlm("profile", *TINY, "--out", tmp_path / "out", "--nsys",
                    env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert "needs a CUDA device" in one_line_error(result.returncode, result.stderr)


NSYS_PROBE_S = 90  # a working nsys profiles a one-kernel script in well under this


def nsys_problem(nsys, folder) -> str | None:
    """None when ``nsys`` can profile a trivial CUDA script into a report within NSYS_PROBE_S; else why not.
    Some GPU machines carry an nsys that hangs or writes nothing (no driver support, no permissions): there the
    test says so and skips instead of spending the GPU check's time."""
    report = folder / "probe"
    command = [nsys, "profile", "--trace=cuda", f"--output={report}", "--force-overwrite=true", sys.executable, "-c",
               "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NSYS_PROBE_S)
    except subprocess.TimeoutExpired:
        return f"nsys did not profile a one-kernel script within {NSYS_PROBE_S} s"
    if result.returncode != 0 or not (folder / "probe.nsys-rep").is_file():
        return f"nsys cannot make a report here (exit {result.returncode}: {(result.stderr or result.stdout)[-200:]})"
    return None


def test_an_nsys_that_fails_or_hangs_is_a_reason_to_skip(tmp_path, monkeypatch):
    broken = fake_tool(tmp_path / "bin", "nsys", "echo 'no CUDA driver' >&2; exit 1")
    assert "exit 1: no CUDA driver" in nsys_problem(broken, tmp_path)
    silent = fake_tool(tmp_path / "bin2", "nsys", "exit 0")  # succeeds but writes no report
    assert "cannot make a report" in nsys_problem(silent, tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "NSYS_PROBE_S", 1)
    hanging = fake_tool(tmp_path / "bin3", "nsys", "exec sleep 30")
    assert "within 1 s" in nsys_problem(hanging, tmp_path)
    working = fake_tool(tmp_path / "bin4", "nsys", f"touch {tmp_path / 'probe.nsys-rep'}")
    assert nsys_problem(working, tmp_path) is None


@pytest.mark.gpu
def test_nsys_captures_the_measured_steps(tmp_path):
    nsys = external_profilers.find_tool("nsys", external_profilers.NSYS_PLACES)
    if nsys is None:
        pytest.skip("Nsight Systems (nsys) is not installed on this GPU machine")
    problem = nsys_problem(nsys, tmp_path)
    if problem is not None:
        pytest.skip(problem)
    out = tmp_path / "nsys"
    result = fastlm("profile", "--data", "generated", "--device", "cuda", "--warmup", 2, "--steps", 5,
                    "--trace-steps", 0, "--out", out, "--nsys", timeout=240)
    assert result.returncode == 0, result.stderr
    assert (out / "nsys.nsys-rep").stat().st_size > 0
    stats = subprocess.run([nsys, "stats", "--report", "nvtx_sum", str(out / "nsys.nsys-rep")],
                           capture_output=True, text=True, timeout=120)
    for name in ("forward", "backward", "optimizer"):
        assert name in stats.stdout, stats.stdout + stats.stderr


@pytest.mark.gpu
@pytest.mark.perf
def test_profile_on_gpu_adds_up_and_traces_kernels(tmp_path):
    out = tmp_path / "gpu"
    result = fastlm("profile", "--data", "generated", "--device", "cuda", "--warmup", 5, "--steps", 20,
                    "--trace-steps", 2, "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "breakdown.json").read_text())
    assert 0.97 <= data["coverage"] <= 1.03 and data["device"].startswith("cuda")
    assert data["ran"]["cuda_graph_captures"] >= 1 and data["ran"]["cuda_graph_replays"] > 0
    assert data["step_ms"]["window_mean"] == pytest.approx(data["step_ms"]["mean"], rel=0.03)
    with gzip.open(out / "trace.json.gz", "rt", encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)


@pytest.mark.parametrize("args, words", [
    (("--warmup", 0), ("--warmup", "at least 1")),
    (("--steps", 0), ("--steps",)),
    (("--trace-steps", -1), ("--trace-steps",)),
    (("--py-spy", "--nsys"), ("not allowed with",)),
])
def test_bad_profile_options_are_one_line_errors(args, words, tmp_path):
    status, _, err = run_cli("profile", *TINY, "--out", tmp_path / "out", *args)
    line = one_line_error(status, err)
    for word in words:
        assert word in line


def test_profile_help_lists_its_options():
    result = fastlm("profile", "--help")
    assert result.returncode == 0
    for flag in ("--warmup", "--steps", "--out", "--py-spy", "--nsys", "--backend", "--bptt"):
        assert flag in result.stdout


@pytest.mark.parametrize("step", ["fast", "example"])
def test_the_breakdown_names_its_step_and_splits_backward_into_parts(step, tmp_path):
    """Each breakdown says which step it measured, on what, in which precision; backward's parts (the decoder's
    and loss's gradients, the recurrent layers' back-propagation through time, the embedding's gradient) add up
    to backward; the flow chart shows evaluation, test and the detached hidden state."""
    out = tmp_path / step
    status, _, err = run_cli("profile", *TINY, "--step", step, "--warmup", 2, "--steps", 6, "--trace-steps", 0,
                             "--out", out, "--threads", 1)
    assert status == 0, err
    data = json.loads((out / "breakdown.json").read_text())
    assert (data["step"], data["precision"], data["threads"]) == (step, "fp32", 1)
    assert data["backend_runs_as"] == "torch.nn on CPU (ATen/oneDNN kernels)" and "1 thread)" in data["title"]
    assert data["title"].count(f"{step} step") == 1
    parts = data["backward_parts"]
    assert set(parts) == set(BACKWARD_PARTS) and all(parts[name]["mean_ms"] > 0 for name in BACKWARD_PARTS)
    backward = data["phases"]["backward"]["mean_ms"]
    assert sum(parts[name]["mean_ms"] for name in BACKWARD_PARTS) == pytest.approx(backward, rel=0.03)
    if step == "example":  # the example's backward is mostly the decoder's gradient GEMMs
        assert parts["decoder_grad"]["mean_ms"] > parts["embedding_grad"]["mean_ms"]
    assert set(data["evaluation"]) == {"valid", "test"} and data["evaluation"]["valid"]["ms_per_batch"] > 0
    assert data["parameters"]["total"] > 0
    svg = (out / "flow.svg").read_text()
    for words in ("validation", "test", "detached", "RNN gradients", "(BPTT)", "embedding"):
        assert words in svg, words
    table = (out / "breakdown.md").read_text()
    assert "| &nbsp;&nbsp;rnn_grad |" in table and f"{step} step" in table
