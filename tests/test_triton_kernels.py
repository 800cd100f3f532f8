"""The Triton step kernels' launch machinery: step-indexed offsets, tile choice and tuning, TF32, and
compiled parity at the example's medium size.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py) and the tuner is driven by a fake timing
function; the tests marked gpu run the compiled kernels and the real tuning (each timed candidate costs a
compile, so they stay few).
"""

import functools
import json
import logging

import pytest
import torch

from fastlm import cells
from fastlm.cells import triton_tiles
from fastlm.cells.triton_tiles import (
    LaunchConfig,
    TileKey,
    TileTuner,
    candidates,
    heuristic_config,
    interpreter_config,
)
from tests.helpers import DEVICE, backend_param, build_pair, make_inputs, run
from tests.tolerances import assert_fp32_parity

TRITON = cells.unavailable_reason("lstm", "triton")
needs_triton = pytest.mark.skipif(TRITON is not None, reason=f"lstm/triton: {TRITON}")
MACHINE = "Fake GPU 80GB, triton 0.0"
KEY = TileKey("lstm_forward", 20, 200, "float32", False)


class FakeTimer:
    """measure(config) -> ms from a rule, counting calls; ``fail`` lists configs that raise instead."""

    def __init__(self, rule=None, fail=()):
        self.rule = rule or (lambda config: config.block_b * 10 + config.block_h + config.block_k / 100)
        self.fail = set(fail)
        self.calls = []

    def __call__(self, config):
        self.calls.append(config)
        if config in self.fail:
            raise RuntimeError(f"out of resources for {config}\nsecond line")
        return float(self.rule(config))


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLM_TRITON_TUNE", raising=False)
    monkeypatch.setattr(triton_tiles, "capturing", lambda: False)
    return TileTuner(tmp_path / "cache")


# --- tile candidates and configs ---------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 16, 20, 64, 200])
@pytest.mark.parametrize("hidden", [10, 200, 650, 1500])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_candidates_are_few_valid_and_start_with_the_heuristic(batch, hidden, dtype):
    key = TileKey("gru_backward", batch, hidden, dtype, False)
    found = candidates(key)
    assert found[0] == heuristic_config(key)
    assert 2 <= len(found) <= 8 and len(set(found)) == len(found)
    for config in found:  # LaunchConfig validates on construction; this restates tl.dot's rule
        assert all(n >= 16 and n & (n - 1) == 0 for n in (config.block_b, config.block_h, config.block_k))
        assert config.num_warps in (2, 4, 8)


@pytest.mark.parametrize("fields", [(10, 16, 16), (16, 8, 16), (16, 16, 48), (16, 16, 16, 3), (16.0, 16, 16)])
def test_launch_config_refuses_tiles_tl_dot_cannot_take(fields):
    with pytest.raises(ValueError, match="LaunchConfig"):
        LaunchConfig(*fields)


def test_launch_config_grid_covers_ragged_shapes():
    assert LaunchConfig(16, 32, 16).grid(33, 40) == (3, 2)
    assert LaunchConfig(64, 16, 32).grid(20, 200) == (1, 13)


# --- the tuner ------------------------------------------------------------------------------------------


def test_tuner_picks_the_fastest_candidate_once(tuner):
    timer = FakeTimer()
    choice = tuner.choose(KEY, MACHINE, timer)
    assert choice.source == "tuned"
    assert timer.calls == candidates(KEY)
    assert choice.config == min(candidates(KEY), key=timer.rule)
    assert tuner.choose(KEY, MACHINE, timer) == choice
    assert len(timer.calls) == len(candidates(KEY)), "a chosen key was timed again"


def test_a_tie_keeps_the_heuristic(tuner):
    assert tuner.choose(KEY, MACHINE, FakeTimer(rule=lambda config: 1.0)).config == heuristic_config(KEY)


def test_tuned_tiles_are_cached_on_disk_per_machine(tuner, tmp_path):
    first = tuner.choose(KEY, MACHINE, FakeTimer())
    path = tuner.cache_file(MACHINE)
    assert path.parent == tmp_path / "cache" / "triton-tiles" and " " not in path.name
    data = json.loads(path.read_text())
    assert data["machine"] == MACHINE and KEY.text() in data["configs"]

    timer = FakeTimer()
    again = TileTuner(tmp_path / "cache").choose(KEY, MACHINE, timer)  # a new process, as far as memory goes
    assert (again.config, again.source, timer.calls) == (first.config, "cached", [])

    other_gpu = TileTuner(tmp_path / "cache").choose(KEY, "Other GPU, triton 0.0", timer)
    assert other_gpu.source == "tuned" and timer.calls


def test_the_cache_follows_fastlm_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert TileTuner().cache_file(MACHINE).parent == tmp_path / "elsewhere" / "triton-tiles"


@pytest.mark.parametrize("other", [
    TileKey("lstm_forward", 21, 200, "float32", False),
    TileKey("lstm_forward", 20, 201, "float32", False),
    TileKey("lstm_forward", 20, 200, "bfloat16", False),
    TileKey("lstm_forward", 20, 200, "float32", True),
    TileKey("lstm_backward", 20, 200, "float32", False),
    TileKey("gru_forward", 20, 200, "float32", False),
])
def test_each_kernel_shape_dtype_and_tf32_is_its_own_key(tuner, tmp_path, other):
    assert tuner.choose(KEY, MACHINE, FakeTimer()).config == LaunchConfig(16, 16, 32, 2)
    slow_small_tiles = FakeTimer(rule=lambda config: 1.0 / (config.block_b * config.block_h * config.block_k))
    chosen = tuner.choose(other, MACHINE, slow_small_tiles)
    assert chosen.source == "tuned" and chosen.config == max(candidates(other), key=lambda c: c.block_b * c.block_h
                                                              * c.block_k)
    configs = json.loads(tuner.cache_file(MACHINE).read_text())["configs"]
    assert set(configs) == {KEY.text(), other.text()}
    fresh = TileTuner(tmp_path / "cache")
    assert fresh.choose(KEY, MACHINE, FakeTimer()).config == LaunchConfig(16, 16, 32, 2)
    assert fresh.choose(other, MACHINE, FakeTimer()).config == chosen.config


@pytest.mark.parametrize("content", [
    "{not json",
    b"\xff\xfe\x00",
    "[1, 2, 3]",
    json.dumps({"format": 99, "machine": MACHINE, "configs": {}}),
    json.dumps({"format": 1, "machine": "another machine", "configs": {}}),
    json.dumps({"format": 1, "machine": MACHINE, "configs": {KEY.text(): {"block_b": 10, "block_h": 16,
                                                                          "block_k": 16, "num_warps": 4}}}),
    json.dumps({"format": 1, "machine": MACHINE, "configs": {KEY.text(): {"block_b": 16}}}),
    json.dumps({"format": 1, "machine": MACHINE, "configs": {KEY.text(): [16, 16, 16, 4]}}),
])
def test_an_unreadable_cache_is_ignored_with_a_warning_and_replaced(tuner, content):
    path = tuner.cache_file(MACHINE)
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    timer = FakeTimer()
    with pytest.warns(UserWarning, match="ignoring the Triton tile cache") as caught:
        choice = tuner.choose(KEY, MACHINE, timer)
    assert choice.source == "tuned" and timer.calls
    assert all("\n" not in str(w.message) for w in caught), "the warning is one line"
    assert KEY.text() in json.loads(path.read_text())["configs"], "the next tuning rewrites the file"


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_tiles, "capturing", lambda: False)
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    tuner = TileTuner(blocker)  # the cache folder would have to live inside a file
    with pytest.warns(UserWarning) as caught:
        assert tuner.choose(KEY, MACHINE, FakeTimer()).source == "tuned"
    messages = [str(w.message) for w in caught]
    assert any("cannot write the Triton tile cache" in m for m in messages), messages
    assert all("ignoring the Triton tile cache" in m or "cannot write" in m for m in messages), messages


def test_no_tuning_under_the_interpreter(tuner):
    timer = FakeTimer()
    choice = tuner.choose(KEY, MACHINE, timer, interpreted=True)
    assert (choice.config, choice.source, timer.calls) == (interpreter_config(20, 200), "heuristic", [])
    assert choice.config == LaunchConfig(32, 256, 256), "the interpreter keeps the fewest, largest tiles"
    assert not tuner.cache_file(MACHINE).exists()


def test_fastlm_triton_tune_0_turns_tuning_off(tuner, monkeypatch):
    monkeypatch.setenv("FASTLM_TRITON_TUNE", "0")
    timer = FakeTimer()
    choice = tuner.choose(KEY, MACHINE, timer)
    assert (choice.config, choice.source, timer.calls) == (heuristic_config(KEY), "heuristic", [])


def test_no_tuning_while_a_cuda_graph_is_captured(tuner, monkeypatch):
    monkeypatch.setattr(triton_tiles, "capturing", lambda: True)
    timer = FakeTimer()
    assert tuner.choose(KEY, MACHINE, timer).source == "heuristic" and not timer.calls
    monkeypatch.setattr(triton_tiles, "capturing", lambda: False)
    tuned = tuner.choose(KEY, MACHINE, timer)
    assert tuned.source == "tuned", "a heuristic used during capture is not remembered"
    monkeypatch.setattr(triton_tiles, "capturing", lambda: True)
    assert tuner.choose(KEY, MACHINE, timer) == tuned, "a graph captured after warm-up gets the tuned tiles"
    from_disk = TileTuner(tuner.cache_dir).choose(KEY, MACHINE, timer)
    assert (from_disk.config, from_disk.source) == (tuned.config, "cached"), "and so does a fresh process's graph"
    assert len(timer.calls) == len(candidates(KEY))


def test_candidates_that_fail_are_skipped(tuner, caplog):
    fastest = min(candidates(KEY), key=FakeTimer().rule)
    with caplog.at_level(logging.WARNING, logger=triton_tiles.__name__):
        choice = tuner.choose(KEY, MACHINE, FakeTimer(fail={fastest}))
    assert choice.source == "tuned" and choice.config != fastest
    assert "out of resources" in caplog.text and "second line" not in caplog.text


def test_when_no_candidate_runs_the_heuristic_is_used_and_nothing_cached(tuner):
    timer = FakeTimer(fail=set(candidates(KEY)))
    choice = tuner.choose(KEY, MACHINE, timer)
    assert (choice.config, choice.source) == (heuristic_config(KEY), "heuristic")
    assert not tuner.cache_file(MACHINE).exists()
    tuner.choose(KEY, MACHINE, timer)
    assert len(timer.calls) == len(candidates(KEY)), "a key whose candidates all failed is not retried"


# --- the kernels under the interpreter (compiled on a GPU) ------------------------------------------------


def _kernels():
    from fastlm.cells.triton import kernels

    return kernels()


@needs_triton
@pytest.mark.parametrize("name", triton_tiles.KERNELS)
def test_scratch_launches_run(name):
    """What the tuner times: one step of each kernel on scratch buffers, with multi-tile grids."""
    _kernels().scratch[name](17, 24, torch.float32, DEVICE, LaunchConfig(16, 16, 16), False)()


@needs_triton
@pytest.mark.parametrize("name", triton_tiles.KERNELS)
def test_the_tuner_times_the_kernel_its_key_names(name, monkeypatch):
    """The measure the stack hands the tuner launches the scratch step of the key's kernel, shape and dtype
    (on CPU the CUDA-graph timer is replaced by one launch)."""
    import fastlm.cells.triton as backend

    launched = []
    monkeypatch.setattr(backend, "time_launch", lambda launch: launched.append(launch()) or 0.5)
    measure = backend._measure_on(TileKey(name, 5, 20, "float16", False), torch.device(DEVICE))
    assert measure(LaunchConfig(16, 16, 16)) == 0.5 and launched == [None]


@needs_triton
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_step_writes_its_own_rows_and_reads_the_initial_state_at_t0(cell):
    """Step t writes row t of the sequence buffers and nothing else, and reads h_{t-1} from row t-1, or
    from h0 (and c0) at t = 0: the offsets the kernels compute from t."""
    T, B, H = 3, 5, 24
    k = _kernels()
    rand = functools.partial(torch.rand, device=DEVICE)
    gi, h0, c0 = rand(T, B, 4 * H), rand(B, H), rand(B, H)
    y, cs, saved = (torch.full((T, B, n * H), float("nan"), device=DEVICE) for n in (1, 1, 4))
    config = LaunchConfig(16, 16, 16)
    if cell == "lstm":
        launch = k.lstm.lstm_forward_launcher(gi, rand(H, 4 * H), h0, y, c0, cs, saved, config, False)
        written = (y, cs, saved)
    else:
        launch = k.gru.gru_forward_launcher(gi[..., :3 * H].contiguous(), rand(H, 3 * H), rand(H), h0, y, saved,
                                            config, False)
        written = (y, saved)
    for t in range(T):
        launch(t)  # at t = 0 a read of "row -1" of y or cs instead of h0 / c0 would carry NaN forward
        for buffer in written:
            assert buffer[:t + 1].isfinite().all(), f"step {t} left its row unwritten or read NaN"
            assert buffer[t + 1:].isnan().all(), f"step {t} wrote past its row"


@pytest.mark.parametrize("cell, backend", [backend_param("lstm", "triton"), backend_param("gru", "triton")])
def test_parity_over_many_steps(cell, backend):
    """Twelve steps, two layers: every step's offsets, far from both ends of the sequence."""
    shape, layers = (12, 3, 4, 18), 2
    ref, other = build_pair(cell, backend, shape, layers)
    x, state, cotangents = make_inputs(cell, shape, layers)
    assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))


def test_offsets_inside_a_step_must_fit_int32():
    from fastlm.kernels.common import check_offsets  # imports triton, like every kernel module

    check_offsets(64, 1500, 4)
    with pytest.raises(ValueError, match="int32"):
        check_offsets(2**19, 1500, 4)  # one step of [B, 4H] holds 3.1e9 elements


# --- the stack: what it reports, TF32 ------------------------------------------------------------------


@pytest.mark.parametrize("cell, backend", [backend_param("lstm", "triton"), backend_param("gru", "triton")])
def test_launch_configs_report_the_last_call(cell, backend, monkeypatch):
    monkeypatch.setenv("FASTLM_TRITON_TUNE", "0")  # on a GPU: tuning is the 650 test's (a compile per candidate)
    stack = cells.build(cell=cell, backend=backend, input_size=6, hidden_size=20, num_layers=2,
                        variant="per-step").to(DEVICE)
    assert stack.launch_configs() == {}
    x = torch.randn(3, 5, 6, device=DEVICE)
    stack(x)[0].sum().backward()
    reported = stack.launch_configs()
    assert set(reported) == {f"{cell}_forward", f"{cell}_backward"}
    for entry in reported.values():
        assert entry["source"] == "heuristic"
        assert (entry["batch"], entry["hidden"], entry["dtype"]) == (5, 20, "float32")
        assert json.loads(json.dumps(entry)) == entry
    tiles = LaunchConfig(*(reported[f"{cell}_forward"][f] for f in ("block_b", "block_h", "block_k", "num_warps")))
    assert tiles == (interpreter_config(5, 20) if stack.interpreted
                     else heuristic_config(TileKey(f"{cell}_forward", 5, 20, "float32", False)))

    with torch.no_grad():
        stack(x)
    assert set(stack.launch_configs()) == {f"{cell}_forward"}, "a no-grad call runs no backward kernel"

    stack.launch_config = LaunchConfig(16, 16, 16, 2)
    stack(x)[0].sum().backward()
    assert {entry["source"] for entry in stack.launch_configs().values()} == {"override"}
    assert {entry["num_warps"] for entry in stack.launch_configs().values()} == {2}


@needs_triton
def test_tf32_follows_torchs_flag_at_every_call():
    from fastlm.cells.triton import allow_tf32

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False, True):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert allow_tf32(torch.float32, interpreted=False) is flag
            assert allow_tf32(torch.bfloat16, interpreted=False) is False
            assert allow_tf32(torch.float32, interpreted=True) is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --- compiled, on a GPU -------------------------------------------------------------------------------------


@pytest.fixture
def exact_fp32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("cell, backend", [backend_param("lstm", "triton"), backend_param("gru", "triton")])
def test_compiled_parity_at_650_three_layers_35_steps(cell, backend, exact_fp32_matmuls, monkeypatch):
    """The example's medium model on the compiled kernels, with tiles tuned here, against the reference:
    fp32, TF32 off, forward and backward within 1e-5 (kernels/common.py says why that holds)."""
    monkeypatch.delenv("FASTLM_TRITON_TUNE", raising=False)
    shape, layers = (35, 20, 650, 650), 3
    ref, other = build_pair(cell, backend, shape, layers, variant="per-step")
    x, state, cotangents = make_inputs(cell, shape, layers)
    errors = assert_fp32_parity(run(other, cell, x, state, cotangents), run(ref, cell, x, state, cotangents))
    print(f"{cell}: largest relative error {max(errors.values()):.2e}; tiles {other.launch_configs()}")
    assert {entry["source"] for entry in other.launch_configs().values()} <= {"tuned", "cached"}


@pytest.mark.gpu
@pytest.mark.parametrize("cell, backend", [backend_param("lstm", "triton")])
def test_compiled_kernels_take_tf32_from_each_call(cell, backend, monkeypatch):
    monkeypatch.setenv("FASTLM_TRITON_TUNE", "0")  # two compiles, not two tunings
    stack = cells.build(cell=cell, backend=backend, input_size=32, hidden_size=64).to(DEVICE)
    x = torch.randn(4, 16, 32, device=DEVICE)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = flag
            with torch.no_grad():
                stack(x)
            assert stack.launch_configs()["lstm_forward"]["allow_tf32"] is flag
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
