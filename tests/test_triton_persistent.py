"""The persistent variant of the triton backend: how it is chosen and reported, the grid barrier's code, the
kernels compiled for sm_90, and (on a GPU) multi-program parity, the fallback to per-step and CUDA graphs.

On CPU the kernels run under TRITON_INTERPRET=1, one program at a time, so a grid of several programs can
only run when no barrier is crossed (T = 1); the barrier code itself runs with a grid of one program (it
passes at once, or times out when the counter says others are missing). Parity of the persistent variant
at the parity suite's shapes is in test_cells_parity.py; the tests marked gpu run the compiled multi-program
kernels, and one test compiles them for sm_90 (no GPU needed) to check the barrier's instructions.
"""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

import fastlm.cells.triton as backend
from fastlm import cells
from fastlm.cells import registry
from fastlm.cells.triton_tiles import LaunchConfig, PersistentConfig, interpreter_config, persistent_config
from fastlm.errors import FastlmError
from tests.helpers import DEVICE, build_pair, make_inputs, run
from tests.tolerances import assert_fp32_parity, assert_within_plain_error, relative_errors

TRITON = cells.unavailable_reason("lstm", "triton")
pytestmark = pytest.mark.skipif(TRITON is not None, reason=f"lstm/triton: {TRITON}")
# conftest.py set TRITON_INTERPRET=1 without CUDA before anything imported triton: compiled or interpreted.
triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")
grid_sync = pytest.importorskip("fastlm.kernels.grid_barrier").grid_sync
CELLS = ["lstm", "gru"]


@pytest.fixture(autouse=True)
def _untuned_triton_tiles(monkeypatch):
    """Per-step fallbacks on their heuristic tiles: tuning is test_triton_kernels.py's."""
    monkeypatch.setenv("FASTLM_TRITON_TUNE", "0")


@pytest.fixture
def fresh_residency(monkeypatch):
    """An empty co-residency verdict cache, so that patched device limits or kernels are consulted."""
    monkeypatch.setattr(backend, "_RESIDENCY", {})


# --- the rules: tiles, grid, mode; which variant runs ------------------------------------------------------


@pytest.mark.parametrize("batch, hidden, gates, dtype, tf32, tiles, programs, resident", [
    (20, 200, 4, "float32", False, LaunchConfig(32, 16, 32, 4), 13, False),  # exact fp32 streams (FMA dots)
    (20, 200, 4, "float32", True, LaunchConfig(32, 16, 256, 8), 13, True),  # the example's 2x200 in TF32
    (64, 200, 4, "float32", True, LaunchConfig(64, 16, 32, 4), 13, False),  # h operand over 32 KiB
    (20, 512, 4, "bfloat16", False, LaunchConfig(32, 16, 512, 8), 32, True),
    (64, 512, 4, "bfloat16", False, LaunchConfig(64, 16, 64, 4), 32, False),
    (20, 650, 4, "bfloat16", False, LaunchConfig(32, 16, 64, 4), 41, False),  # W_hh slices over 64 KiB
    (20, 512, 3, "bfloat16", False, LaunchConfig(32, 16, 512, 8), 32, True),
    (1, 1024, 3, "float16", False, LaunchConfig(16, 16, 64, 4), 64, False),
    (5, 16, 4, "float32", False, LaunchConfig(16, 16, 32, 4), 1, True),  # one block: no barrier; one K chunk
])
def test_compiled_persistent_config_follows_the_documented_rule(batch, hidden, gates, dtype, tf32, tiles, programs,
                                                                resident):
    config = persistent_config(batch, hidden, gates, dtype, tf32, interpreted=False)
    assert (config.tiles, config.programs, config.resident) == (tiles, programs, resident)
    assert config.single_program == (programs == 1)
    meta = config.meta()
    assert meta["num_stages"] == 1 and meta["SINGLE_PROGRAM"] == (programs == 1) and meta["RESIDENT"] == resident


@pytest.mark.parametrize("batch, hidden, tiles, resident", [
    (5, 40, None, True),  # the interpreter's tiles cover H = 40 in one block and one K tile
    (5, 300, None, False),  # two hidden blocks of 256 in one program: W_hh cannot stay resident
    (33, 40, LaunchConfig(16, 16, 16), False),
    (33, 40, LaunchConfig(16, 64, 64), True),
])
def test_interpreted_persistent_config_is_one_program(batch, hidden, tiles, resident):
    config = persistent_config(batch, hidden, 4, "float32", False, interpreted=True, tiles=tiles)
    assert config.programs == 1 and config.single_program and config.resident == resident
    assert config.tiles == (tiles or interpreter_config(batch, hidden))


def test_override_tiles_set_the_compiled_grid_and_mode():
    assert persistent_config(20, 40, 4, "float32", False, False, LaunchConfig(16, 16, 16)).programs == 3
    resident = persistent_config(20, 40, 4, "float32", False, False, LaunchConfig(16, 16, 64))
    assert (resident.programs, resident.resident) == (3, True)


class Residency:
    """residency() stand-in: returns ``reason``, counting calls."""

    def __init__(self, reason=None):
        self.reason, self.calls = reason, 0

    def __call__(self):
        self.calls += 1
        return self.reason


@pytest.mark.parametrize("requested, interpreted, batch, hidden, why_not, variant, says, checked", [
    ("per-step", False, 20, 200, None, "per-step", "as asked", False),
    ("per-step", True, 20, 200, None, "per-step", "as asked", False),
    ("persistent", True, 20, 200, None, "persistent", "one program", False),
    ("auto", True, 20, 200, None, "per-step", "interpreter", False),
    ("auto", False, 20, 200, None, "persistent", "auto chose persistent", True),
    ("auto", False, 65, 200, None, "per-step", "outside B <= 64", False),
    ("auto", False, 20, 1025, None, "per-step", "H <= 1024", False),
    ("persistent", False, 128, 2048, None, "persistent", "as asked", True),
    ("persistent", False, 20, 200, "too big", "per-step", "persistent fell back to per-step", True),
    ("auto", False, 20, 200, "too big", "per-step", "auto fell back to per-step", True),
])
def test_variant_rule(requested, interpreted, batch, hidden, why_not, variant, says, checked):
    residency = Residency(why_not)
    chosen, reason = backend.choose_variant(requested, interpreted, batch, hidden, residency)
    assert chosen == variant and says in reason
    assert residency.calls == int(checked), "co-residency is checked where, and only where, it decides"
    if why_not:
        assert why_not in reason


LIMITS = {"sms": 132, "max_num_regs": 65536, "max_shared_mem": 232448}
CUDA0 = torch.device("cuda", 0)  # a name only: nothing below touches a device


class FakeCompiled:
    """What residency() reads from a compiled Triton kernel."""

    def __init__(self, registers=96, shared=6144, warps=4):
        self.n_regs, self.n_spills = registers, 0
        self.metadata = SimpleNamespace(shared=shared, num_warps=warps)


def _fake_kernels(monkeypatch, limits, compiled=None, error=None):
    """Patches the device limits and the compile step of residency(); returns the list of compiles asked for."""
    kernels = backend.kernels()
    monkeypatch.setattr(kernels.grid_barrier, "device_limits", lambda index: dict(limits))
    asked = []

    def compile_(batch, hidden, dtype, device, config, tf32):
        asked.append(config)
        if error is not None:
            raise error
        return {"forward": compiled or FakeCompiled(), "backward": FakeCompiled()}

    monkeypatch.setitem(kernels.compiled_persistent, "lstm", compile_)
    return asked


def test_a_grid_wider_than_the_gpu_is_refused_before_compiling(monkeypatch, fresh_residency):
    asked = _fake_kernels(monkeypatch, {**LIMITS, "sms": 4})
    config = persistent_config(20, 200, 4, "float32", False, interpreted=False)
    reason, resources = backend.residency("lstm", config, 20, 200, torch.float32, False, CUDA0)
    assert "13 programs" in reason and "4 SMs" in reason
    assert (resources, asked) == ({}, [])


@pytest.mark.parametrize("compiled, says", [
    (FakeCompiled(registers=255, warps=16), "lstm_forward: one program needs 130560 registers"),
    (FakeCompiled(shared=300000), "lstm_forward: one program needs 300000 bytes of shared memory"),
    (FakeCompiled(), None),
])
def test_each_persistent_kernel_must_fit_an_sm(monkeypatch, fresh_residency, compiled, says):
    asked = _fake_kernels(monkeypatch, LIMITS, compiled)
    config = persistent_config(20, 200, 4, "float32", False, interpreted=False)
    reason, resources = backend.residency("lstm", config, 20, 200, torch.float32, False, CUDA0)
    assert reason == says or says in reason
    assert set(resources) == {"lstm_forward", "lstm_backward"} and asked == [config]
    assert resources["lstm_backward"] == {"registers": 96, "spills": 0, "shared_bytes": 6144, "num_warps": 4}
    backend.residency("lstm", config, 20, 200, torch.float32, False, CUDA0)
    assert asked == [config], "a verdict is remembered"


def test_a_kernel_that_cannot_load_is_a_reason_not_a_crash(monkeypatch, fresh_residency):
    from triton.runtime.errors import OutOfResources

    _fake_kernels(monkeypatch, LIMITS, error=OutOfResources(300000, 232448, "shared memory"))
    config = persistent_config(20, 200, 4, "float32", False, interpreted=False)
    reason, _ = backend.residency("lstm", config, 20, 200, torch.float32, False, CUDA0)
    assert reason.startswith("one program does not fit an SM")


def test_one_program_needs_no_check(monkeypatch, fresh_residency):
    asked = _fake_kernels(monkeypatch, {**LIMITS, "sms": 0})
    config = persistent_config(5, 16, 4, "float32", False, interpreted=False)
    assert backend.residency("lstm", config, 5, 16, torch.float32, False, CUDA0) == (None, {}) and asked == []


@pytest.mark.parametrize("cell", CELLS)
def test_the_compile_for_the_check_binds_each_kernels_arguments(cell, monkeypatch):
    """What residency() compiles on a GPU (``warmup``: compile, do not launch), checked here against each
    kernel's signature: every argument bound once, the grid one program per hidden block."""
    import inspect

    from fastlm.kernels import persistent_gru, persistent_lstm

    module = {"lstm": persistent_lstm, "gru": persistent_gru}[cell]
    config = persistent_config(20, 40, 4, "float32", False, interpreted=False)
    launch_only = {"grid", "num_warps", "num_stages", "launch_cooperative_grid"}

    def fake_warmup(kernel):
        def warmup(*args, **kwargs):
            assert kwargs["grid"] == (config.programs,) and kwargs["num_stages"] == 1
            assert kwargs["launch_cooperative_grid"] is True  # the launch's options: compiled into the kernel
            inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in launch_only})
            return kernel.fn.__name__
        return warmup

    for direction in ("forward", "backward"):
        kernel = getattr(module, f"{cell}_{direction}_persistent")
        monkeypatch.setattr(kernel, "warmup", fake_warmup(kernel), raising=False)
    compiled = getattr(module, f"{cell}_persistent_compiled")(20, 40, torch.float32, "cpu", config, False)
    assert compiled == {"forward": f"{cell}_forward_persistent", "backward": f"{cell}_backward_persistent"}


def test_only_launches_with_a_grid_barrier_are_cooperative():
    """A cooperative launch makes the driver refuse a grid that cannot be resident at once; one program needs
    no barrier and launches as any kernel."""
    from fastlm.kernels.grid_barrier import launch_options

    multi, single = (PersistentConfig(LaunchConfig(16, 16, 16), programs, False) for programs in (3, 1))
    assert launch_options(multi) == {**multi.meta(), "launch_cooperative_grid": True}
    assert launch_options(single) == single.meta() and "launch_cooperative_grid" not in single.meta()


# --- building and reporting ----------------------------------------------------------------------------------


def test_variants_pass_through_cells_build():
    assert registry.variants("triton") == backend.VARIANTS == ("per-step", "persistent", "auto")
    assert registry.variants("reference") == ()
    for variant in backend.VARIANTS:
        assert cells.build(cell="gru", backend="triton", input_size=3, hidden_size=4,
                           variant=variant).requested_variant == variant
    assert cells.build(cell="gru", backend="triton", input_size=3, hidden_size=4).requested_variant == "auto"
    cells.build(cell="lstm", backend="reference", input_size=3, hidden_size=4, variant="auto")  # everyone's default
    with pytest.raises(FastlmError, match="backend 'reference' has no variant 'persistent'"):
        cells.build(cell="lstm", backend="reference", input_size=3, hidden_size=4, variant="persistent")
    with pytest.raises(FastlmError, match="no variant 'fast' .*per-step, persistent, auto"):
        cells.build(cell="lstm", backend="triton", input_size=3, hidden_size=4, variant="fast")
    with pytest.raises(FastlmError, match="unknown variant 'fast'"):
        backend.TritonStack("lstm", 3, 4, variant="fast")


@pytest.mark.parametrize("cell", CELLS)
def test_a_persistent_stack_reports_what_it_ran(cell):
    stack = cells.build(cell=cell, backend="triton", input_size=6, hidden_size=20, num_layers=2,
                        variant="persistent").to(DEVICE)
    assert (stack.requested_variant, stack.variant, stack.launch_configs()) == ("persistent", "persistent", {})
    assert "expected before the first call" in stack.variant_reason
    x = torch.randn(3, 5, 6, device=DEVICE)
    stack(x)[0].sum().backward()
    assert stack.variant == "persistent" and "expected" not in stack.variant_reason
    assert "1 launch per layer forward and 1 backward" in stack.describe() and stack.variant_reason in stack.describe()
    records = stack.launch_configs()
    assert set(records) == {f"{cell}_forward", f"{cell}_backward"}
    for record in records.values():
        assert json.loads(json.dumps(record)) == record
        assert (record["variant"], record["source"], record["batch"], record["hidden"], record["dtype"]) == (
            "persistent", "fixed", 5, 20, "float32")
        assert record["variant_reason"] == stack.variant_reason
        if stack.interpreted:
            assert (record["programs"], record["single_program"], record["resident"]) == (1, True, True)
        else:
            assert record["programs"] == 2 and {"registers", "spills", "shared_bytes"} <= set(record)

    with torch.no_grad():
        stack(x)
    assert set(stack.launch_configs()) == {f"{cell}_forward"}, "a no-grad call runs no backward kernel"
    stack.launch_config = LaunchConfig(16, 16, 16, 2)
    stack(x)[0].sum().backward()
    assert {(r["source"], r["num_warps"], r["resident"]) for r in stack.launch_configs().values()} == {
        ("override", 2, False)}


@pytest.mark.parametrize("cell", CELLS)
def test_auto_and_per_step_report_their_choice(cell):
    x = torch.randn(3, 5, 6, device=DEVICE)
    auto = cells.build(cell=cell, backend="triton", input_size=6, hidden_size=20).to(DEVICE)
    per_step = cells.build(cell=cell, backend="triton", input_size=6, hidden_size=20, variant="per-step").to(DEVICE)
    for stack in (auto, per_step):
        stack(x)[0].sum().backward()
        assert {record["variant"] for record in stack.launch_configs().values()} == {stack.variant}
    assert per_step.variant == "per-step" and "1 fused kernel per time step" in per_step.describe()
    assert auto.variant == ("per-step" if auto.interpreted else "persistent"), auto.variant_reason
    assert auto.variant_reason.startswith("auto chose")


# --- the kernels under the interpreter: the barrier code, several programs -----------------------------------


@dataclasses.dataclass(frozen=True)
class BarrierOfOne(PersistentConfig):
    """One program that still runs the grid-barrier code (SINGLE_PROGRAM off): it passes each barrier at once."""

    @property
    def single_program(self) -> bool:
        return False


def _use_configs(monkeypatch, make):
    """Makes every persistent call of fastlm.cells.triton use make(config that the rule chose, hidden)."""
    rule = backend.persistent_config

    def patched(batch, hidden, gates, dtype, tf32, interpreted, tiles=None):
        return make(rule(batch, hidden, gates, dtype, tf32, interpreted, tiles), hidden)

    monkeypatch.setattr(backend, "persistent_config", patched)


def _record_barriers(monkeypatch):
    """The barrier buffers the launches allocate, in order."""
    from fastlm.kernels import grid_barrier

    made, allocate = [], grid_barrier.barrier_buffer
    monkeypatch.setattr(grid_barrier, "barrier_buffer", lambda device: made.append(allocate(device)) or made[-1])
    return made


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tiles", [None, LaunchConfig(16, 16, 16)], ids=["resident", "streamed"])
def test_the_grid_barrier_code_passes_with_one_program(cell, tiles, monkeypatch):
    """Every step but the last ends in grid_sync: with one program each barrier completes on its own
    arrival, so the count ends at T - 1 and no wait times out; the numbers match the reference."""
    _use_configs(monkeypatch, lambda config, hidden: BarrierOfOne(config.tiles, 1, config.resident))
    barriers = _record_barriers(monkeypatch)
    shape, layers = (4, 3, 5, 24), 2
    ref, other = build_pair(cell, "triton", shape, layers, variant="persistent")
    other.launch_config = tiles
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    assert len(barriers) == 2 * layers, "one barrier state per launch: forward and backward of each layer"
    for sync in barriers:
        assert sync.tolist() == [shape[0] - 1, 0]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("block_k, resident", [(64, True), (16, False)])
@pytest.mark.parametrize("shape", [(1, 3, 5, 40), (1, 1, 4, 33)])
def test_several_programs_split_the_hidden_units(cell, block_k, resident, shape, monkeypatch):
    """A compiled-style grid (one program per 16 hidden units, each loading its own resident W_hh slices by
    program id) at T = 1, where no barrier is crossed, so the interpreter can run it."""
    def grid(config, hidden):
        return PersistentConfig(LaunchConfig(16, 16, block_k), -(-hidden // 16), resident)

    _use_configs(monkeypatch, grid)
    layers = 2
    ref, other = build_pair(cell, "triton", shape, layers, variant="persistent")
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    record = other.launch_configs()[f"{cell}_forward"]
    assert (record["programs"], record["resident"], record["single_program"]) == (-(-shape[3] // 16), resident, False)


@triton.jit
def one_barrier(sync_ptr, barrier, patience, out_ptr):
    """Crosses one grid barrier and stores what grid_sync returned."""
    tl.store(out_ptr, grid_sync(sync_ptr, barrier, patience))


@pytest.mark.parametrize("count, barrier, patience, after, returned", [
    (0, 0, 8, [1, 0], 8),  # the only program: complete on its own arrival
    (4, 2, 8, [5, 0], 8),  # (as if) the others arrived already: 5 >= (2 + 1) x 1
    (0, 1, 8, [1, 1], 0),  # barrier 1 needs a second arrival that never comes: 8 polls, then the timeout word
    (0, 1, 0, [1, 1], 0),  # no patience left (an earlier wait timed out): arrive, do not wait
])
def test_grid_sync_counts_arrivals_and_times_out(count, barrier, patience, after, returned):
    """The barrier protocol with a grid of one program, the counter preset as if other programs had arrived
    (or not); compiled on a GPU, interpreted here."""
    from fastlm.kernels.grid_barrier import check_barrier

    sync = torch.tensor([count, 0], dtype=torch.int32, device=DEVICE)
    out = torch.full((1,), -1, dtype=torch.int32, device=DEVICE)
    one_barrier[(1,)](sync, barrier, patience, out)
    assert (sync.tolist(), out.item()) == (after, returned)
    if after[1] and DEVICE == "cpu":  # on CUDA the assert would end the process's CUDA context
        with pytest.raises(RuntimeError, match="grid barrier timed out"):
            check_barrier(sync)


def test_several_programs_are_refused_a_barrier_under_the_interpreter():
    from fastlm.kernels.common import INTERPRETED
    from fastlm.kernels.grid_barrier import barrier_state

    config = PersistentConfig(LaunchConfig(16, 16, 16), 3, False)
    like = torch.zeros(1, device=DEVICE)
    assert barrier_state(like, config, 1)[1] is True
    if INTERPRETED:
        with pytest.raises(ValueError, match="cannot pass a grid barrier under the Triton interpreter"):
            barrier_state(like, config, 2)
    with pytest.raises(ValueError, match="int32"):
        barrier_state(like, config, 2**30)


# --- compiled for a GPU, without one -------------------------------------------------------------------------

COMPILE_FOR_SM90 = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlm.kernels import persistent_gru, persistent_lstm

def compile_(kernel, dtype, resident, single):
    x = "*" + dtype
    pointers = {name: "*i32" if name == "sync_ptr" else "*fp32" if name in ("c0_ptr", "cs_ptr", "dc_ptr", "dhz_ptr")
                else x for name in kernel.arg_names if name.endswith("_ptr")}
    const = dict(ALLOW_TF32=False, RESIDENT=resident, SINGLE_PROGRAM=single, BLOCK_B=32, BLOCK_H=16,
                 BLOCK_K=256 if resident else 64)
    const.update({name: True for name in ("SAVE_GATES", "SAVE") if name in kernel.arg_names})
    signature = {name: "constexpr" if name in const else pointers.get(name, "i32") for name in kernel.arg_names}
    options = {"num_warps": 8 if resident else 4, "num_stages": 1}
    ptx = triton.compile(ASTSource(kernel, signature, constexprs=const), target=GPUTarget("cuda", 90, 32),
                         options=options).asm["ptx"]
    return {"acq_rel_add": "atom.global.gpu.acq_rel.add" in ptx, "acquire_poll": ".gpu.acquire" in ptx,
            "bar_sync": "bar.sync" in ptx, "cg_loads": "ld.global.cg" in ptx}

kernels = [persistent_lstm.lstm_forward_persistent, persistent_lstm.lstm_backward_persistent,
           persistent_gru.gru_forward_persistent, persistent_gru.gru_backward_persistent]
modes = [("bf16", True, False), ("fp32", False, False), ("fp32", False, True)]
print(json.dumps({f"{kernel.fn.__name__} {dtype} resident={int(resident)} single={int(single)}":
                  compile_(kernel, dtype, resident, single)
                  for kernel in kernels for dtype, resident, single in modes}))
"""


def test_the_persistent_kernels_compile_for_sm90():
    """Triton compiles every persistent kernel for an H100/H200 (sm_90) without a GPU, in a process without
    TRITON_INTERPRET: the multi-program ones with the grid barrier's instructions (acq_rel arrival, acquire
    polls, CTA barriers, L2-only loads of the exchanged rows), the single-program ones without atomics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(facts) == 12
    for name, found in facts.items():
        single = name.endswith("single=1")
        assert found == {"acq_rel_add": not single, "acquire_poll": not single, "bar_sync": True,
                         "cg_loads": True}, name


# --- compiled, on a GPU: several programs behind the grid barrier ----------------------------------------------


@pytest.fixture
def exact_fp32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


# (T, B, E, H), layers: the example's small and medium models and a 1024-wide layer.
GPU_SHAPES = [((35, 20, 200, 200), 2), ((35, 20, 650, 650), 2), ((35, 16, 256, 1024), 1)]


def _shape_id(case):
    (T, B, E, H), layers = case
    return f"{layers}x{H}-T{T}B{B}"


def _assert_multi_program(stack, cell):
    assert stack.variant == "persistent", stack.variant_reason
    record = stack.launch_configs()[f"{cell}_forward"]
    assert record["programs"] > 1 and not record["single_program"], record
    return record


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", GPU_SHAPES, ids=_shape_id)
def test_multi_program_parity_fp32(cell, case, exact_fp32_matmuls):
    shape, layers = case
    ref, other = build_pair(cell, "triton", shape, layers, variant="persistent")
    x, state, cotangents = make_inputs(cell, shape, layers)
    errors = assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    record = _assert_multi_program(other, cell)
    print(f"{cell} {_shape_id(case)} fp32: largest relative error {max(errors.values()):.2e}; {record}")


def _low_precision_errors(cell, shape, layers, dtype, variant):
    """(errors of the triton stack in ``dtype``, errors of plain PyTorch in ``dtype``), both against the fp32
    reference, as the parity suite's low-precision rule measures them; and the triton stack."""
    ref, other = build_pair(cell, "triton", shape, layers, variant=variant)
    x, state, cotangents = make_inputs(cell, shape, layers)
    exact = run(ref, cell, x, state, cotangents)
    cast = (lambda s: tuple(t.to(dtype) for t in s)) if cell == "lstm" else (lambda s: s.to(dtype))
    ref_err = relative_errors(run(ref.to(dtype), cell, x.to(dtype), cast(state), cotangents), exact)
    got_err = relative_errors(run(other.to(dtype), cell, x.to(dtype), cast(state), cotangents), exact)
    return got_err, ref_err, other


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", GPU_SHAPES, ids=_shape_id)
def test_multi_program_bf16_within_twice_pytorch_error(cell, case, exact_fp32_matmuls):
    shape, layers = case
    got, plain, other = _low_precision_errors(cell, shape, layers, torch.bfloat16, "persistent")
    record = _assert_multi_program(other, cell)
    assert record["resident"] == (shape[3] <= 256), "bf16 W_hh slices stay on chip up to H = 512 at B = 20..32"
    assert_within_plain_error(got, plain, "bf16 errors above twice the plain-PyTorch error")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_resident_tf32_within_twice_the_per_step_error(cell, exact_fp32_matmuls):
    """fp32 with TF32: the resident path at 2x200 (W_hh slices on chip), against the per-step kernels in
    TF32, both measured against the exact fp32 reference."""
    shape, layers = (35, 20, 200, 200), 2
    ref, persistent = build_pair(cell, "triton", shape, layers, variant="persistent")
    _, per_step = build_pair(cell, "triton", shape, layers, variant="per-step")
    x, state, cotangents = make_inputs(cell, shape, layers)
    exact = run(ref, cell, x, state, cotangents)
    torch.backends.cuda.matmul.allow_tf32 = True
    got = relative_errors(run(persistent, cell, x, state, cotangents), exact)
    baseline = relative_errors(run(per_step, cell, x, state, cotangents), exact)
    assert _assert_multi_program(persistent, cell)["resident"] and per_step.variant == "per-step"
    assert_within_plain_error(got, baseline, "TF32 errors above twice the per-step kernels'")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_every_arrival_is_counted_over_many_steps(cell, monkeypatch, exact_fp32_matmuls):
    barriers = _record_barriers(monkeypatch)
    shape, layers = (200, 8, 16, 96), 1
    ref, other = build_pair(cell, "triton", shape, layers, variant="persistent")
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    programs = _assert_multi_program(other, cell)["programs"]
    assert len(barriers) == 2
    for sync in barriers:
        assert sync.tolist() == [programs * (shape[0] - 1), 0]


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("variant", ["persistent", "auto"])
def test_falls_back_to_per_step_when_the_grid_cannot_be_co_resident(cell, variant, monkeypatch, fresh_residency,
                                                                     exact_fp32_matmuls):
    """A GPU of 4 SMs, as far as the check knows: 2x200's 13 programs cannot all be resident, so the stack runs
    per-step, says why, and computes the same numbers."""
    kernels = backend.kernels()
    limits = kernels.grid_barrier.device_limits(torch.cuda.current_device())
    monkeypatch.setattr(kernels.grid_barrier, "device_limits", lambda index: {**limits, "sms": 4})
    shape, layers = (35, 20, 200, 200), 2
    ref, other = build_pair(cell, "triton", shape, layers, variant=variant)
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    assert other.variant == "per-step"
    assert f"{variant} fell back to per-step" in other.variant_reason
    assert "13 programs" in other.variant_reason and "4 SMs" in other.variant_reason
    assert {(r["variant"], r["variant_reason"]) for r in other.launch_configs().values()} == {
        ("per-step", other.variant_reason)}


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_a_persistent_stack_replays_in_a_cuda_graph(cell, exact_fp32_matmuls):
    """Forward and backward captured after eager warm-up (the co-residency verdict is remembered by then, so
    nothing compiles during capture) replay to the eager numbers."""
    shape, layers = (35, 20, 200, 200), 2
    _, stack = build_pair(cell, "triton", shape, layers, variant="persistent")
    x, state, cotangents = make_inputs(cell, shape, layers)
    params = list(stack.parameters())

    def step():
        y, final = stack(x, state)
        outputs = [y] + (list(final) if cell == "lstm" else [final])
        loss = sum((out * cot).sum() for out, cot in zip(outputs, cotangents, strict=True))
        return [y.detach()] + list(torch.autograd.grad(loss, params))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    _assert_multi_program(stack, cell)
    for got, want in zip(captured, eager, strict=True):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()  # cuBLAS may pick other GEMM algorithms
