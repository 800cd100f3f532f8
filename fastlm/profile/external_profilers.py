"""`fastlm profile --py-spy` and `--nsys`: the same profile, re-run as a child of an external profiler.

The child is ``python -m fastlm profile --config OUT/profile-config.toml ...``: the parent writes its resolved
configuration (config file and flags merged) into the output folder as TOML, every field spelled out, so the
child runs exactly what the user asked for, and the printed nsys command works as it is.

- py-spy samples Python stacks. It runs the child twice, once per output format (speedscope JSON, flame-graph
  SVG), since it writes one format per recording; the second child writes into a scratch folder and skips
  the torch trace. Note that py-spy pauses the process for each sample (100 per second), so the breakdown
  written by a py-spy run carries a little sampling overhead.
- Nsight Systems records CUDA, NVTX (the phase names) and OS runtime calls, with the capture limited by
  ``--capture-range=cudaProfilerApi`` to the measured steps, which `fastlm profile` brackets with
  cudaProfilerStart/Stop.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fastlm.config import write_toml
from fastlm.device import resolve_device
from fastlm.errors import FastlmError
from fastlm.profile.breakdown import BREAKDOWN_JSON

PY_SPY_SPEEDSCOPE, PY_SPY_FLAMEGRAPH, NSYS_REPORT = "py-spy.speedscope.json", "py-spy-flamegraph.svg", "nsys"
CONFIG_TOML = "profile-config.toml"  # the resolved configuration the re-run reads
NSYS_PLACES = ("/usr/local/cuda/bin/nsys", "/opt/nvidia/nsight-systems/*/bin/nsys",
               "/usr/local/cuda*/nsight-systems-*/bin/nsys")


def find_tool(name: str, places=()) -> str | None:
    """``name`` on PATH, else beside this Python (a venv's bin/, not on PATH when not activated), else in
    ``places`` (glob patterns of usual install locations)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    for pattern in places:
        for candidate in sorted(glob.glob(pattern), reverse=True):  # newest version first
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def child_argv(config_path: Path, options, out: Path, trace_steps: int | None = None) -> list[str]:
    """``fastlm profile`` arguments for the run configured in ``config_path`` (see fastlm.config.write_toml)."""
    steps = options.trace_steps if trace_steps is None else trace_steps
    return ["profile", "--config", str(config_path), "--warmup", str(options.warmup), "--steps", str(options.steps),
            "--trace-steps", str(steps), "--out", str(out)]


def _fastlm(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastlm", *argv]


# ------------------------------------------------------------------------------------------------ py-spy

def rerun_under_py_spy(config, options, out: Path) -> int:
    py_spy = find_tool("py-spy")
    if py_spy is None:
        raise FastlmError("--py-spy needs py-spy, which is not installed here (or not on PATH): "
                          "pip install py-spy, then run again")
    speedscope, flamegraph, config_path = out / PY_SPY_SPEEDSCOPE, out / PY_SPY_FLAMEGRAPH, out / CONFIG_TOML
    write_toml(config, config_path)
    _record(py_spy, "speedscope", speedscope, child_argv(config_path, options, out), out)
    with tempfile.TemporaryDirectory(prefix="fastlm-py-spy-") as scratch:
        _record(py_spy, "flamegraph", flamegraph, child_argv(config_path, options, Path(scratch), trace_steps=0),
                Path(scratch), quiet=True)
    print(f"py-spy: {speedscope} (open at https://www.speedscope.app) and {flamegraph} (open in a browser)")
    return 0


def _record(py_spy: str, fmt: str, output: Path, argv: list[str], child_out: Path, quiet: bool = False) -> None:
    """py-spy record of one child run. Its stderr is relayed line by line as it comes (and kept, to tell a
    permission problem or the child's own error); its stdout streams through unless ``quiet``."""
    for stale in (output, child_out / BREAKDOWN_JSON):
        stale.unlink(missing_ok=True)
    command = [py_spy, "record", "--format", fmt, "--output", str(output), "--", *_fastlm(argv)]
    lines, child_error = [], []
    with subprocess.Popen(command, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE,
                          text=True) as process:
        for line in process.stderr:
            line = line.rstrip("\n")
            lines.append(line)
            if line.startswith("fastlm: error: "):
                child_error.append(line)  # raised below as this command's own one-line error
            else:
                print(line, file=sys.stderr)
    text = "\n".join(line for line in lines if line not in child_error).lower()  # py-spy's words only
    if "permission denied" in text or "operation not permitted" in text:
        raise FastlmError("py-spy lacks permission to read the profiled process: run as root, or allow ptrace "
                          "(sudo sysctl kernel.yama.ptrace_scope=0; in Docker: --cap-add SYS_PTRACE)")
    if child_error:  # the run itself failed, for a reason the child already put in one line
        raise FastlmError(child_error[-1].removeprefix("fastlm: error: "))
    if process.returncode != 0 or not output.is_file():
        last = next((line for line in reversed(lines) if line.strip()), "no message")
        raise FastlmError(f"py-spy record failed (status {process.returncode}): {last}")
    if not (child_out / BREAKDOWN_JSON).is_file():
        raise FastlmError(f"the profiled run under py-spy did not finish (its output is above); it was: "
                          f"{shlex.join(command)}")


# ------------------------------------------------------------------------------------------------ nsys

def nsys_command(nsys: str, options, out: Path) -> list[str]:
    return [nsys, "profile", "--trace=cuda,nvtx,osrt,cudnn,cublas", "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop", "--force-overwrite=true", f"--output={out / NSYS_REPORT}",
            *_fastlm(child_argv(out / CONFIG_TOML, options, out))]


def rerun_under_nsys(config, options, out: Path) -> int:
    write_toml(config, out / CONFIG_TOML)  # also what the printed command reads
    nsys = find_tool("nsys", NSYS_PLACES)
    if nsys is None:
        command = shlex.join(nsys_command("nsys", options, out))
        raise FastlmError(f"--nsys needs Nsight Systems (nsys), which is not installed here or not on PATH; "
                          f"install it (https://developer.nvidia.com/nsight-systems) and run: {command}")
    device = resolve_device(config.train.device)
    if device.type != "cuda":
        raise FastlmError(f"--nsys limits the capture to the measured steps with cudaProfilerStart/Stop, which "
                          f"needs a CUDA device, but this run is on {device}; on CPU use --py-spy or trace.json.gz")
    command = nsys_command(nsys, options, out)
    print(f"fastlm: running {shlex.join(command)}", file=sys.stderr)
    result = subprocess.run(command)
    report = out / f"{NSYS_REPORT}.nsys-rep"
    if result.returncode != 0:
        raise FastlmError(f"nsys exited with status {result.returncode} (its output is above); the command was: "
                          f"{shlex.join(command)}")
    if not report.is_file():
        raise FastlmError(f"nsys wrote no {report}; the command was: {shlex.join(command)}")
    print(f"nsys: {report} (open with nsys-ui, or: nsys stats {report})")
    return 0
