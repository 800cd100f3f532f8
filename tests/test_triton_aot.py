"""Every Triton kernel fastlm launches compiles for an H100/H200 (sm_90) and an A100 (sm_80), here, without a
GPU, and fits the part: registers and shared memory within an SM's, local memory (ptxas' spills) within the
bound documented below per kernel, and the persistent grids co-resident on a 132-SM and a 108-SM part by the
launcher's own check (kernels/grid_barrier.py: coresidency_reason), multi-program launches cooperative.

tests/triton_aot.py does the compiling, in a process of its own without TRITON_INTERPRET (this session runs
the kernels interpreted, and a kernel decorated for the interpreter cannot be compiled): it runs the layers'
host code and takes each launch's compile inputs from Triton's own argument binding, so what is compiled is
what a launch on the GPU compiles. Which shapes and tiles: ``covering_cases`` there states the rule. 100
compiles, in parallel over the CPU cores: 76 s of CPU time cold (measured, Triton 3.6), so ~40 s on two idle
cores; seconds from Triton's cache. On a heavily loaded machine it can pass COMPILE_LIMIT_S and fail.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm.kernels.tiles import persistent_config
from fastlm.errors import first_line
from tests.triton_aot import covering_cases

triton = pytest.importorskip("triton", reason="triton is not installed")
grid_barrier = pytest.importorskip("fastlm.kernels.grid_barrier")

ROOT = Path(__file__).resolve().parents[1]
COMPILE_LIMIT_S = 540  # under pytest-timeout's 600 s, so that this limit ends the compile processes
# What bounds co-residency on each part, in grid_barrier.device_limits' fields: SMs, 32-bit registers per SM
# and the opt-in shared memory of one block (CUDA's limits for compute capability 9.0 and 8.0).
PARTS = {
    "sm_90": {"sms": 132, "max_num_regs": 65536, "max_shared_mem": 232448},  # H100 SXM, H200
    "sm_80": {"sms": 108, "max_num_regs": 65536, "max_shared_mem": 166912},  # A100
}
# Local memory (ptxas' spill stores) per thread, bytes: the most seen for each kernel over the covering set,
# both targets, Triton 3.6 and 3.9. The step kernels' four (three) fp32 accumulators, the libdevice
# activations' temporaries and, in fp32, the FMA products of IEEE tl.dot come near ptxas' 255 registers at
# the 32- and 64-wide tiles; it spills a few words there, not in the time loop's hot path alone (the LSTM
# persistent forward at B = 64 in fp32 spills most: its 64-row batch tile). A change that needs more
# registers than these kernels do now shows here first.
LOCAL_BYTES_BOUND = {
    "lstm_forward_step": 32, "lstm_backward_step": 32, "gru_forward_step": 24, "gru_backward_step": 64,
    "lstm_forward_persistent": 96, "lstm_backward_persistent": 8, "gru_forward_persistent": 8,
    "gru_backward_persistent": 0,
}
KERNELS = sorted(LOCAL_BYTES_BOUND)


def _missing_compiler():
    """Why kernels cannot be compiled here (no NVIDIA backend, no ptxas or cuobjdump), or None."""
    try:
        from triton import knobs

        for tool in (knobs.nvidia.ptxas, knobs.nvidia.cuobjdump):
            if not Path(tool.path).is_file():
                return f"{tool.path} is missing"
    except Exception as error:  # noqa: BLE001 - any failure to find the tools means: cannot compile here
        return f"triton's NVIDIA tools are not available ({first_line(error)})"
    return None


@pytest.fixture(scope="module")
def compiled():
    """{"sm_90": [compile], "sm_80": [compile]}: tests/triton_aot.py's output, compiled once per test module."""
    missing = _missing_compiler()
    if missing is not None:
        pytest.skip(f"cannot compile for a GPU here: {missing}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    # A session of its own: past the limit, the script and its compile processes end together.
    with subprocess.Popen([sys.executable, str(ROOT / "tests" / "triton_aot.py"), "90", "80"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as done:
        try:
            stdout, stderr = done.communicate(timeout=COMPILE_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(done.pid, signal.SIGKILL)
            done.communicate()
            pytest.fail(f"compiling for sm_90 and sm_80 took over {COMPILE_LIMIT_S} s (a loaded machine, cold cache?)")
    assert done.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _needs(entry: dict) -> dict:
    """A compile's resources as grid_barrier.kernel_resources gives them on a GPU (the driver counts local
    memory in 4-byte "spills")."""
    return {"registers": entry["registers"], "spills": entry["local_bytes"] // 4,
            "shared_bytes": entry["shared_bytes"], "num_warps": entry["num_warps"]}


@pytest.mark.slow
@pytest.mark.parametrize("target", PARTS)
def test_every_case_compiles_every_kernel_it_launches(compiled, target):
    entries = compiled[target]
    launched = {label for entry in entries for label in entry["cases"]}
    assert launched == {case.label() for case in covering_cases()}
    assert sorted({entry["kernel"] for entry in entries}) == KERNELS
    for entry in entries:
        assert 0 < entry["registers"] <= 255 and entry["num_warps"] in (2, 4, 8), entry


@pytest.mark.slow
@pytest.mark.parametrize("target", PARTS)
def test_each_program_fits_an_sm(compiled, target):
    for entry in compiled[target]:
        assert grid_barrier.resources_reason(_needs(entry), PARTS[target]) is None, entry


@pytest.mark.slow
@pytest.mark.parametrize("target", PARTS)
def test_spills_stay_within_each_kernels_bound(compiled, target):
    over = [(entry["kernel"], entry["cases"][0], entry["local_bytes"]) for entry in compiled[target]
            if entry["local_bytes"] > LOCAL_BYTES_BOUND[entry["kernel"]]]
    assert not over, f"local memory over LOCAL_BYTES_BOUND: {over}"


@pytest.mark.slow
@pytest.mark.parametrize("target", PARTS)
def test_persistent_grids_are_co_resident_and_launched_cooperatively(compiled, target):
    checked = 0
    for case in covering_cases():
        if case.variant != "persistent":
            continue
        config = persistent_config(case.batch, case.hidden, {"lstm": 4, "gru": 3}[case.cell], case.dtype,
                                   case.tf32, interpreted=False)
        entries = [entry for entry in compiled[target] if case.label() in entry["cases"]]
        assert {entry["kernel"] for entry in entries} == {f"{case.cell}_forward_persistent",
                                                          f"{case.cell}_backward_persistent"}
        resources = {f"{entry['kernel']} {entry['constexprs']}": _needs(entry) for entry in entries}
        assert grid_barrier.coresidency_reason(config.programs, resources, PARTS[target]) is None, case.label()
        for entry in entries:
            assert entry["options"]["num_stages"] == 1, entry
            assert entry["options"]["launch_cooperative_grid"] is (not config.single_program), entry
        checked += 1
    assert checked == 12  # two cells x (three precisions at 2x200, bf16 at 2x650, two largest-tile cases)


def test_the_co_residency_check_refuses_what_does_not_fit():
    """The check the persistent test above relies on can fail: too many programs, or too large a program."""
    fits = {"registers": 255, "spills": 0, "shared_bytes": 100 * 1024, "num_warps": 8}
    a100 = PARTS["sm_80"]
    assert grid_barrier.coresidency_reason(108, {"k": fits}, a100) is None
    assert "exceeds the 108 SMs" in grid_barrier.coresidency_reason(109, {"k": fits}, a100)
    too_wide = dict(fits, num_warps=16)
    assert "k: one program needs" in grid_barrier.coresidency_reason(64, {"k": too_wide}, a100)
    too_much_shared = dict(fits, shared_bytes=a100["max_shared_mem"] + 1)
    assert "shared memory" in grid_barrier.coresidency_reason(64, {"k": too_much_shared}, a100)
