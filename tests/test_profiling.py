"""The phase timer, the breakdown built from it, its picture, and the profile's own measurement loop.

The central claim of `fastlm profile` is checked here on a real training step: the phases the timer reports
add up to the step's wall time measured apart from the timer, within 3%.
"""

import time
import xml.etree.ElementTree as ET

import pytest
import torch

from fastlm import timing
from fastlm.cli import build_parser, config_from_args
from fastlm.config import RunConfig, load_toml, write_toml
from fastlm.data import generated_corpus
from fastlm.profile import breakdown, flowchart
from fastlm.profile.command import ProfileOptions, StepRunner, full_chunks, measure
from fastlm.profile.external_profilers import child_argv
from fastlm.timing import (
    BACKWARD,
    CLIP,
    DATA,
    DECODER,
    EMBEDDING,
    FORWARD,
    FORWARD_PARTS,
    LOSS,
    OPTIMIZER,
    PHASES,
    RNN,
    STEP,
    PhaseTimer,
    active_timer,
    phase,
)
from fastlm.train.trainer import Trainer
from tests.helpers import backend_param, quiet_display


def one_step(timer, sleeps):
    """A fake step with the real nesting: data, forward (embedding, rnn, decoder, loss), backward, clip, opt."""
    with timer.step():
        for name in PHASES:
            with timer.phase(name):
                if name == FORWARD:
                    with active_timer(timer):
                        for part in FORWARD_PARTS:
                            with phase(part):
                                time.sleep(sleeps.get(part, 0.0))
                time.sleep(sleeps.get(name, 0.0))


@pytest.mark.perf
def test_timer_records_nesting_and_per_step_totals():
    timer = PhaseTimer("cpu")
    for _ in range(3):
        one_step(timer, {RNN: 0.004, BACKWARD: 0.006})
    samples = timer.collect()
    assert len(timer.per_step) == 3 and len(samples[RNN]) == 3
    assert timer.parents[STEP] is None
    assert {name: timer.parents[name] for name in PHASES} == dict.fromkeys(PHASES, STEP)
    assert {name: timer.parents[name] for name in FORWARD_PARTS} == dict.fromkeys(FORWARD_PARTS, FORWARD)
    for record in timer.per_step:
        assert 4.0 <= record[RNN] < 4.0 + 20 and 6.0 <= record[BACKWARD] < 6.0 + 20
        assert record[FORWARD] >= record[RNN]
        assert record[STEP] >= sum(record[name] for name in PHASES)
    timer.reset()
    assert not timer.samples and not timer.per_step


class FakeCudaEvent:
    """Stands in for torch.cuda.Event on CPU: records perf_counter, counts creations and waits."""

    created = 0
    waits = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        FakeCudaEvent.created += 1
        self.time = None

    def record(self):
        self.time = time.perf_counter()

    def synchronize(self):
        FakeCudaEvent.waits += 1

    def elapsed_time(self, end):
        return (end.time - self.time) * 1e3


@pytest.mark.perf
def test_cuda_path_reads_events_once_per_window_and_reuses_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    FakeCudaEvent.created = FakeCudaEvent.waits = 0
    timer = PhaseTimer(torch.device("cuda"))
    for window in range(3):
        for _ in range(2):
            one_step(timer, {BACKWARD: 0.002})
        timer.collect()
        assert FakeCudaEvent.waits == window + 1  # one wait per window, none inside a phase
    per_step = timer.per_step
    assert len(per_step) == 6 and all(2.0 <= record[BACKWARD] < 22.0 for record in per_step)
    events_per_window = 2 * 2 * (1 + len(PHASES) + len(FORWARD_PARTS))
    assert FakeCudaEvent.created == events_per_window  # later windows reuse the first window's events


def test_a_phase_entered_twice_in_a_step_is_summed():
    timer = PhaseTimer("cpu")
    with timer.step():
        for _ in range(2):
            with timer.phase(DECODER):
                time.sleep(0.003)
    timer.collect()
    assert len(timer.samples[DECODER]) == 2
    assert timer.per_step[0][DECODER] == pytest.approx(sum(timer.samples[DECODER]))


def test_disabled_timer_and_no_active_timer_record_nothing():
    timer = PhaseTimer("cpu", enabled=False)
    one_step(timer, {})
    assert not timer.collect() and not timer.per_step and not timer.parents
    with phase(LOSS):  # no active timer: a no-op
        pass
    outer, inner = PhaseTimer("cpu"), PhaseTimer("cpu")
    with active_timer(outer):
        with active_timer(inner):
            with phase(LOSS):
                pass
        with phase(DECODER):
            pass
    assert list(inner.collect()) == [LOSS] and list(outer.collect()) == [DECODER]


def test_nvtx_ranges_carry_the_phase_names_in_nesting_order():
    timer = PhaseTimer("cpu")
    calls = []
    timer._push, timer._pop = (lambda name: calls.append(("push", name))), (lambda: calls.append(("pop",)))
    with timer.step():
        with timer.phase(FORWARD):
            pass
    assert calls == [("push", STEP), ("push", FORWARD), ("pop",), ("pop",)]
    push, pop = timing.nvtx_range_functions()  # the real ones: harmless without a profiler attached
    push(STEP)
    pop()


def test_record_function_ranges_only_while_a_torch_profiler_runs():
    timer = PhaseTimer("cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step(timer, {})
    names = {event.name for event in prof.events()}
    assert {STEP, *PHASES, *FORWARD_PARTS} <= names
    assert not timing.torch_profiler_active()


def fake_records(steps=4):
    """Per-step totals as a timer would give them, and step walls a little above the phase sums."""
    per_step, walls = [], []
    for k in range(steps):
        record = {DATA: 1.0, FORWARD: 10.0 + k, EMBEDDING: 1.0, RNN: 5.0 + k, DECODER: 2.0, LOSS: 1.0,
                  BACKWARD: 20.0, CLIP: 2.0, OPTIMIZER: 1.0}
        record[STEP] = sum(record[name] for name in PHASES) + 0.1
        per_step.append(record)
        walls.append(record[STEP] + 0.1)
    parents = {STEP: None, **dict.fromkeys(PHASES, STEP), **dict.fromkeys(FORWARD_PARTS, FORWARD)}
    return per_step, walls, parents


def test_summarize_shares_are_of_the_measured_step():
    per_step, walls, parents = fake_records()
    result = breakdown.summarize(per_step, walls, parents, tokens_per_step=700)
    step_mean = sum(walls) / len(walls)
    assert result["step_ms"]["mean"] == pytest.approx(step_mean)
    assert result["step_ms"]["median"] == pytest.approx(sorted(walls)[1] / 2 + sorted(walls)[2] / 2)
    assert result["phases"][FORWARD]["mean_ms"] == pytest.approx(11.5)
    assert result["phases"][BACKWARD]["share"] == pytest.approx(20.0 / step_mean)
    assert result["forward_parts"][RNN]["median_ms"] == pytest.approx(6.5)
    assert result["forward_parts"][breakdown.FORWARD_OTHER]["mean_ms"] == pytest.approx(1.0)
    assert result["coverage"] == pytest.approx((1 + 11.5 + 20 + 2 + 1) / step_mean)
    assert sum(entry["share"] for entry in result["phases"].values()) == pytest.approx(result["coverage"])
    assert result["tokens_per_s"] == pytest.approx(700 / (step_mean / 1e3))
    assert not result["notes"]


def test_summarize_reports_a_phase_it_never_saw_as_null_and_keeps_unknown_ones():
    per_step, walls, parents = fake_records()
    for record in per_step:  # as if loss were fused into the decoder, and a graph replay timed on its own
        del record[LOSS]
        record["graph"] = 0.5
    parents.pop(LOSS)
    parents["graph"] = STEP
    result = breakdown.summarize(per_step, walls, parents, tokens_per_step=700)
    assert result["forward_parts"][LOSS] == {"mean_ms": None, "median_ms": None, "share": None}
    assert result["phases"]["graph"]["mean_ms"] == pytest.approx(0.5)
    assert any("'loss'" in note for note in result["notes"])
    text = breakdown.markdown({**result, "title": "t", "steps": 4, "one_off_ms": {"first_step": 5.0}})
    assert "| graph |" in text and "—" in text and "| first step | 5.00 |" in text


def graphed_records(steps=4, eager_first=0):
    """Per-step totals of a step replayed as one CUDA graph: the timer sees the step and its data phase only
    (the first ``eager_first`` steps ran eagerly, with every phase)."""
    per_step, walls, parents = fake_records(steps)
    for k, record in enumerate(per_step):
        if k >= eager_first:
            for name in (*PHASES[1:], *FORWARD_PARTS):
                del record[name]
            record[STEP] = record[DATA] + 3.0 + 0.1
        walls[k] = record[STEP] + 0.05
    return per_step, walls, parents


def test_phases_inside_a_cuda_graph_are_reported_as_one():
    per_step, walls, parents = graphed_records()
    result = breakdown.summarize(per_step, walls, {STEP: None, DATA: STEP}, tokens_per_step=700)
    together = "+".join(PHASES[1:])
    assert result["phases"][together]["mean_ms"] == pytest.approx(3.1)
    assert result["phases"][FORWARD] == breakdown.UNTIMED and result["forward_parts"][RNN] == breakdown.UNTIMED
    assert result["coverage"] == pytest.approx(sum(r[STEP] for r in per_step) / sum(walls))
    assert sum(entry["share"] or 0 for entry in result["phases"].values()) == pytest.approx(result["coverage"])
    assert any(together in note for note in result["notes"])
    mixed_records = graphed_records(eager_first=1)
    mixed = breakdown.summarize(*mixed_records, tokens_per_step=700)
    assert any("'forward' was timed in only 1 of the 4" in note for note in mixed["notes"])
    assert sum(entry["share"] or 0 for entry in mixed["phases"].values()) == pytest.approx(mixed["coverage"])
    assert mixed["coverage"] == pytest.approx(sum(r[STEP] for r in mixed_records[0]) / sum(mixed_records[1]))


def test_flowchart_is_written_as_svg_and_png(tmp_path):
    per_step, walls, parents = fake_records()
    result = breakdown.summarize(per_step, walls, parents, tokens_per_step=700)
    result.update(title="lstm 2x200 test", one_off_ms={"corpus_load": 120.0, "batchify": 3.0})
    flowchart.draw(result, tmp_path / "flow.svg", tmp_path / "flow.png")
    graphed = breakdown.summarize(*graphed_records(), tokens_per_step=700)
    flowchart.draw({**graphed, "title": "graphed"}, tmp_path / "graphed.svg", tmp_path / "graphed.png")
    assert "timed as one" in (tmp_path / "graphed.svg").read_text()
    svg = ET.parse(tmp_path / "flow.svg").getroot()
    text = " ".join(node.text or "" for node in svg.iter() if node.tag.endswith("text"))
    for label in ("prepare", "batchify", "embedding", "RNN", "decoder", "loss", "backward", "clip", "optimizer"):
        assert label in text
    share = result["phases"][BACKWARD]["share"]
    assert f"{100 * share:.1f}%" in text and "one-off 120 ms" in text
    import matplotlib.image

    height, width = matplotlib.image.imread(tmp_path / "flow.png").shape[:2]
    assert width > 1000 and height > 400  # a picture, at a size where the box labels are legible


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_the_data_box_names_a_host_to_device_copy_only_where_there_is_one(tmp_path, device):
    per_step, walls, parents = fake_records()
    result = breakdown.summarize(per_step, walls, parents, tokens_per_step=700)
    flowchart.draw({**result, "title": "t", "device": device}, tmp_path / "flow.svg", tmp_path / "flow.png")
    svg = ET.parse(tmp_path / "flow.svg").getroot()
    text = " ".join(node.text or "" for node in svg.iter() if node.tag.endswith("text"))
    assert ("H2D" in text) == (device != "cpu") and "(fetch" in text, text


@pytest.mark.perf
def test_phases_add_up_to_the_measured_step_on_cpu():
    """The default model (2x200 LSTM, batch 20, bptt 35) on the generated corpus, through Trainer's step."""
    config = RunConfig()
    config.update({"data": {"data": "generated"}, "train": {"device": "cpu"}}, origin="test")
    trainer = Trainer(config.validate(), generated_corpus(), torch.device("cpu"), quiet_display())
    one_off = {}
    per_step, step_ms, window_ms = measure(StepRunner(trainer), warmup=1, steps=6, one_off=one_off)
    result = breakdown.summarize(per_step, step_ms, trainer.timer.parents, tokens_per_step=700)
    assert 0.97 <= result["coverage"] <= 1.03, result["coverage"]
    assert set(result["phases"]) == set(PHASES)
    assert all(result["phases"][name]["mean_ms"] > 0 for name in PHASES)
    assert all(result["forward_parts"][name]["mean_ms"] > 0 for name in FORWARD_PARTS)
    assert window_ms == pytest.approx(result["step_ms"]["mean"], rel=0.03)
    assert {"first_h2d_copy", "first_step", "warmup_rest"} <= set(one_off)


@pytest.mark.gpu
@pytest.mark.perf
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("cell, backend", [backend_param("lstm", "cudnn"), backend_param("lstm", "triton")])
def test_phases_add_up_to_the_measured_step_on_gpu(cell, backend, graphs):
    config = RunConfig()
    config.update({"model": {"backend": backend}, "data": {"data": "generated"},
                   "train": {"device": "cuda", "cuda_graphs": graphs}}, origin="test")
    trainer = Trainer(config.validate(), generated_corpus(), torch.device("cuda"), quiet_display())
    assert (trainer.step_fn.graphs is not None) == graphs, "cuda_graphs on a CUDA device must give a graphed step"
    per_step, step_ms, window_ms = measure(StepRunner(trainer), warmup=5, steps=30, one_off={})
    result = breakdown.summarize(per_step, step_ms, trainer.timer.parents, tokens_per_step=700)
    assert 0.97 <= result["coverage"] <= 1.03, result["coverage"]
    assert window_ms == pytest.approx(result["step_ms"]["mean"], rel=0.03)
    if graphs:
        assert result["phases"]["+".join(PHASES[1:])]["share"] > 0.5
    else:
        assert all(result["phases"][name]["mean_ms"] > 0 for name in PHASES)


def test_full_chunks_leaves_out_only_a_short_last_chunk():
    from fastlm.data.batching import BatchStreamer

    exact = BatchStreamer(torch.arange(36 * 2).view(36, 2), bptt=5, device="cpu")  # 35 targets: 7 full chunks
    ragged = BatchStreamer(torch.arange(38 * 2).view(38, 2), bptt=5, device="cpu")  # 37: 7 full + 1 of 2
    assert (len(exact), full_chunks(exact)) == (7, 7)
    assert (len(ragged), full_chunks(ragged)) == (8, 7)


@pytest.mark.parametrize("flags", [
    [],
    ["--cell", "gru", "--backend", "reference", "--emsize", "64", "--nhid", "64", "--tied", "--dropout", "0.5",
     "--batch-size", "8", "--bptt", "12", "--lr", "5", "--clip", "0.5", "--seed", "7", "--device", "cpu",
     "--data", "data folder/with \"quotes\" and \\ back", "--max-steps", "9", "--max-minutes", "1.5"],
])
def test_the_re_run_command_rebuilds_the_same_configuration(flags, tmp_path):
    """--py-spy and --nsys re-run `fastlm profile` from the resolved config; nothing may get lost on the way."""
    parser = build_parser()
    config = config_from_args(parser.parse_args(["profile", *flags]))
    write_toml(config, tmp_path / "run.toml")
    rebuilt = parser.parse_args(child_argv(tmp_path / "run.toml", ProfileOptions(2, 3, 0), tmp_path / "out"))
    assert config_from_args(rebuilt).to_dict() == config.to_dict()
    assert (rebuilt.warmup, rebuilt.steps, rebuilt.trace_steps, rebuilt.out) == (2, 3, 0, str(tmp_path / "out"))


def test_every_kind_of_config_value_survives_the_toml_file(tmp_path):
    """Whatever fields the configuration grows (lists, non-default booleans), the file carries them."""
    config = RunConfig()
    for section in config.to_dict():
        for name, value in vars(getattr(config, section)).items():
            if isinstance(value, bool):
                setattr(getattr(config, section), name, not value)
    config.model.tied, config.model.emsize = False, 64
    config.train.device = "cpu"
    write_toml(config, tmp_path / "run.toml")
    loaded = RunConfig()
    loaded.update(load_toml(tmp_path / "run.toml"), origin="test")
    assert loaded.to_dict() == config.to_dict()


def test_split_parts_tile_the_phase_and_an_unsplit_phase_stays_whole():
    timer = PhaseTimer("cpu")
    with timer.step():
        with timer.phase(BACKWARD):
            time.sleep(0.002)
            timer.split("first")
            time.sleep(0.002)
            timer.split_rest("rest")
        with timer.phase(CLIP):
            timer.split_rest("never")  # nothing split this phase: no part
    timer.collect()
    record = timer.per_step[0]
    assert record["first"] + record["rest"] == pytest.approx(record[BACKWARD], rel=0.05)
    assert "never" not in record and timer.parents["first"] == timer.parents["rest"] == BACKWARD
