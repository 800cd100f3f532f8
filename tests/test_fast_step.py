"""The fast training step computes the example's step: same losses and weights, no host sync, same schedule."""

import contextlib
import dataclasses
import gc
import math
import weakref

import pytest
import torch

import fastlm.model.loss_chunks
from fastlm.config import ModelConfig, RunConfig
from fastlm.errors import FastlmError
from fastlm.model import RNNLM, map_state
from fastlm.step import how_it_ran, make_train_step
from fastlm.step.cuda_graphs import WARMUP_STEPS, GraphedStep
from fastlm.step.example import ExampleStep
from fastlm.step.fast import TrainStep, graph_blocker
from fastlm.timing import PhaseTimer
from tests.tolerances import FP32_RTOL

VOCAB, T, B = 60, 7, 4


def run_steps(step_class, cell, tied, steps=12, device="cpu", **kwargs):
    """Losses and final weights of ``steps`` steps on a fixed token stream whose last chunk is short."""
    torch.manual_seed(3)
    model = RNNLM(VOCAB, ModelConfig(cell=cell, emsize=16, nhid=16, dropout=0.2, tied=tied)).to(device)
    step = step_class(model, 0.25, 20.0, **kwargs)
    data = torch.randint(VOCAB, (steps * T + 1 - 3, B), generator=torch.Generator().manual_seed(5)).to(device)
    timer, state, losses = PhaseTimer(device, enabled=False), model.init_state(B), []
    for start in range(0, data.shape[0] - 1, T):
        length = min(T, data.shape[0] - 1 - start)
        loss, state = step(data[start:start + length], data[start + 1:start + 1 + length].reshape(-1), state, timer)
        losses.append(loss)
    return torch.stack(losses).double().cpu(), {k: v.cpu() for k, v in model.state_dict().items()}


def max_rel(a, b):
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tied", [False, True])
def test_fast_step_trains_the_examples_numbers(cell, tied):
    fast_losses, fast_weights = run_steps(TrainStep, cell, tied)
    example_losses, example_weights = run_steps(ExampleStep, cell, tied)
    assert max_rel(fast_losses, example_losses) <= FP32_RTOL
    for name, value in example_weights.items():
        assert torch.allclose(fast_weights[name], value, rtol=FP32_RTOL, atol=1e-6), name


def test_several_loss_chunks_stay_within_float_noise(monkeypatch):
    """With chunks and vocabulary blocks smaller than the problem, dW is summed in another order."""
    monkeypatch.setattr(fastlm.model.loss_chunks, "CPU_CHUNK_TOKENS", 8)
    monkeypatch.setattr(fastlm.model.loss_chunks, "CPU_VOCAB_BLOCK", 16)
    fast_losses, _ = run_steps(TrainStep, "lstm", False)
    example_losses, _ = run_steps(ExampleStep, "lstm", False)
    assert max_rel(fast_losses, example_losses) <= 1e-4


def test_step_returns_a_detached_device_loss_and_drops_gradients():
    torch.manual_seed(0)
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8))
    step = TrainStep(model, 0.25, 20.0)
    inputs = torch.randint(VOCAB, (T, B))
    loss, state = step(inputs, torch.randint(VOCAB, (T * B,)), model.init_state(B), PhaseTimer("cpu"))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert all(p.grad is None for p in model.parameters())  # set to None: no pass over their memory
    assert state[0].shape == (2, B, 8)


@pytest.mark.parametrize("step_class", [TrainStep, ExampleStep])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_step_does_not_backpropagate_into_the_state_it_is_given(step_class, cell):
    """Truncated BPTT: the gradient stops at the carried state. Given a state that still has a graph back to
    the weights (as the previous batch's output does, until the step detaches it), the step must update the
    weights exactly as it does for the same values without that graph."""
    inputs, targets = torch.randint(VOCAB, (T, B)), torch.randint(VOCAB, (T * B,))
    updated = []
    for with_graph in (False, True):
        torch.manual_seed(0)
        model = RNNLM(VOCAB, ModelConfig(cell=cell, emsize=8, nhid=8, dropout=0.0))
        step = step_class(model, 0.25, 20.0)
        state = model.init_state(B)
        if with_graph:
            bias = model.decoder.bias
            # Adds exactly zero to the values, but d(state)/d(bias) = 1: a missing detach changes bias's gradient.
            state = map_state(lambda s: s + (bias - bias.detach()).sum(), state)
        step(inputs, targets, state, PhaseTimer("cpu", enabled=False))
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (updated[1] - updated[0]).abs().max().item()
    assert moved == 0.0, f"a state with a graph changed the update by up to {moved:.3e}: the step did not detach it"


def test_learning_rate_lives_in_the_optimizer_that_checkpoints_save():
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8))
    step = TrainStep(model, 0.25, 20.0)
    step.lr /= 4
    saved = step.optimizer.state_dict()
    other = TrainStep(model, 0.25, 20.0)
    other.optimizer.load_state_dict(saved)
    assert other.lr == 5.0


def test_make_train_step_follows_the_configuration():
    config = RunConfig()
    config.update({"model": {"emsize": 8, "nhid": 8}, "train": {"precision": "bf16", "cuda_graphs": True}}, "test")
    model = RNNLM(VOCAB, config.validate().model)
    fast = make_train_step(model, config.train)
    assert isinstance(fast, TrainStep) and fast.precision == "bf16" and fast.decoder_dtype == torch.bfloat16
    assert fast.graphs is None  # CUDA graphs only ever apply on a CUDA device
    config.update({"train": {"step": "example", "precision": "tf32"}}, "test")
    example = make_train_step(model, config.validate().train)
    assert isinstance(example, ExampleStep) and example.precision == "tf32"
    config.update({"train": {"precision": "bf16"}}, "test")
    with pytest.raises(FastlmError, match="--precision fp32 or tf32"):
        config.validate()


def test_example_step_needs_torch_nn_layers_and_the_full_softmax():
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8, backend="reference"))
    with pytest.raises(FastlmError, match="cudnn"):
        ExampleStep(model, 0.25, 20.0)
    config = RunConfig()
    config.update({"model": {"decoder": "adaptive"}, "train": {"step": "example"}}, "test")
    with pytest.raises(FastlmError, match="--step example"):
        config.validate()


class StepAtLr:
    """Just what the graph schedule reads of a step: its lr."""

    def __init__(self, lr: float):
        self.lr = lr


def test_graph_schedule_warms_up_captures_replays_and_recaptures():
    """The CUDA-graph step's decisions, without a GPU: what each call would do."""
    step = StepAtLr(20.0)
    graphed = GraphedStep(step)
    full, short = ((35, 20), (700,)), ((12, 20), (240,))
    assert [graphed.next_action(full, 20.0) for _ in range(WARMUP_STEPS)] == ["warm up"] * WARMUP_STEPS
    assert graphed.next_action(full, 20.0) == "capture"
    graphed.graph, graphed._captured_lr = object(), 20.0  # what a successful capture leaves
    assert graphed.next_action(full, 20.0) == "replay"
    assert graphed.next_action(short, 20.0) == "eager"  # the short last chunk of an epoch
    assert graphed.next_action(full, 20.0) == "replay"
    assert graphed.next_action(full, 5.0) == "capture"  # lr /= 4 at an epoch end: the update is baked in
    graphed.disabled = True  # a capture failed once
    assert graphed.next_action(full, 5.0) == "eager"


def test_a_new_shape_warms_up_again_before_capture():
    step = StepAtLr(1.0)
    graphed = GraphedStep(step)
    a, b = ((5, 2), (10,)), ((6, 2), (12,))
    assert graphed.next_action(a, 1.0) == "warm up"
    assert [graphed.next_action(b, 1.0) for _ in range(WARMUP_STEPS)] == ["warm up"] * WARMUP_STEPS
    assert graphed.next_action(b, 1.0) == "capture"


class EmulatedGraphedStep(GraphedStep):
    """CUDA graph semantics on CPU: capturing runs nothing, and each replay runs the captured body again on
    the static tensors, writing its loss into the captured output tensor, as a replayed graph does."""

    def _warm_up(self, inputs, targets, state, timer):
        return self.step.eager(inputs, targets, state, timer)

    def _capture_graph(self, body):
        loss = torch.zeros(())

        def replay():
            loss.copy_(body()[0])
        return replay, (loss, None)


@pytest.mark.parametrize("cell, precision", [("lstm", "fp32"), ("gru", "fp32"), ("lstm", "bf16")])
def test_graphed_step_bookkeeping_reproduces_the_eager_step(cell, precision):
    """Static inputs, the state carried through the graph's own buffer, the eager short last chunk and the
    capture again after an lr change, on CPU with the graph emulated: the eager step's losses exactly
    (in bf16 too: the weight copy and the state's cast happen inside the captured step)."""
    def run(graphed):
        torch.manual_seed(3)
        model = RNNLM(VOCAB, ModelConfig(cell=cell, emsize=16, nhid=16, dropout=0.2))
        step = TrainStep(model, 0.25, 20.0, precision=precision)
        if graphed:
            step.graphs = EmulatedGraphedStep(step)
        data = torch.randint(VOCAB, (8 * T + 1 - 3, B), generator=torch.Generator().manual_seed(5))
        state, losses = model.init_state(B), []
        for epoch in range(3):  # epoch 2 replays the same graph from a fresh state; epoch 3 captures again
            for start in range(0, data.shape[0] - 1, T):
                length = min(T, data.shape[0] - 1 - start)
                loss, state = step(data[start:start + length], data[start + 1:start + 1 + length].reshape(-1),
                                   state, PhaseTimer("cpu"))
                losses.append(loss.item())
            if epoch == 1:
                step.lr /= 4
            state = model.init_state(B)
        return losses, step

    eager, _ = run(False)
    graphed, step = run(True)
    assert graphed == eager
    assert step.graphs.graph is not None and step.graphs._captured_lr == 20.0 / 4


class FakeStreams:
    """torch.cuda's current stream on a machine without CUDA, and a torch.cuda.graph that fails the way a real
    one does when ending the capture raises: its capture stream left current."""

    def __init__(self, monkeypatch):
        self.current = "default"
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: setattr(self, "current", stream))
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
        monkeypatch.setattr(torch.cuda, "graph", self.failing_graph)

    @contextlib.contextmanager
    def failing_graph(self, graph):
        self.current = "capture"
        yield
        raise RuntimeError("operation not permitted when stream is capturing\nmore lines")


def test_a_failed_capture_leaves_the_process_on_its_own_stream(monkeypatch):
    streams = FakeStreams(monkeypatch)
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8))
    step = TrainStep(model, 0.25, 20.0)
    step.graphs = graphs = GraphedStep(step)
    inputs, targets = torch.randint(VOCAB, (T, B)), torch.randint(VOCAB, (T * B,))
    with pytest.warns(UserWarning, match="capture of the training step failed"):
        assert graphs._capture(inputs, targets, model.init_state(B)) is False
    assert streams.current == "default"
    assert graphs.disabled and graphs.failure == "operation not permitted when stream is capturing"
    assert (graphs.captures, graphs.replays) == (0, 0)
    assert how_it_ran(step)["cuda_graph_note"] == graphs.failure
    assert all(p.grad is None for p in model.parameters())


def test_the_adaptive_decoder_is_never_captured():
    """Its clusters are picked with nonzero(), a host sync: capture would fail, so the step does not try."""
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8, decoder="adaptive", cutoffs=[10]))
    assert "adaptive" in graph_blocker(model)
    assert graph_blocker(RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8))) is None


@pytest.mark.gpu
def test_adaptive_step_on_cuda_runs_eagerly_and_says_why():
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8, decoder="adaptive", cutoffs=[10])).cuda()
    step = TrainStep(model, 0.25, 20.0, cuda_graphs=True)
    state = model.init_state(B)
    for _ in range(WARMUP_STEPS + 2):
        _, state = step(torch.randint(VOCAB, (T, B), device="cuda"), torch.randint(VOCAB, (T * B,), device="cuda"),
                        state, PhaseTimer("cuda", enabled=False))
    ran = how_it_ran(step)
    assert step.graphs is None and ran["cuda_graphs_requested"] and ran["cuda_graph_replays"] == 0
    assert "adaptive" in ran["cuda_graph_note"]


def test_a_step_and_its_graph_are_freed_without_the_cycle_collector():
    """The graph refers to its step weakly: dropping the step frees both at once (and with them the graph's
    memory pool on CUDA), not whenever the cycle collector next runs."""
    model = RNNLM(VOCAB, ModelConfig(emsize=8, nhid=8))
    step = TrainStep(model, 0.25, 20.0)
    step.graphs = EmulatedGraphedStep(step)
    step(torch.randint(VOCAB, (T, B)), torch.randint(VOCAB, (T * B,)), model.init_state(B), PhaseTimer("cpu"))
    step_alive, graph_alive = weakref.ref(step), weakref.ref(step.graphs)
    gc.disable()
    try:
        del step
        assert step_alive() is None and graph_alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("device, cuda_graphs", [
    ("cpu", False),
    pytest.param("cuda", False, marks=pytest.mark.gpu),
    pytest.param("cuda", True, marks=pytest.mark.gpu),  # replays: the skip is decided on the device
])
def test_skip_nonfinite_makes_a_bad_step_a_no_op(device, cuda_graphs):
    """A NaN embedding row for a token only one batch holds: that batch is skipped (finite flag false,
    weights and carried state unchanged) and the batches around it train as usual."""
    torch.manual_seed(0)
    model = RNNLM(VOCAB, ModelConfig(emsize=16, nhid=16, dropout=0.0)).to(device)
    with torch.no_grad():
        model.encoder.weight[VOCAB - 1] = float("nan")
    step = TrainStep(model, 0.25, 20.0, cuda_graphs=cuda_graphs, skip_nonfinite=True)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(VOCAB - 1, (T + 1, B), generator=generator).to(device) for _ in range(WARMUP_STEPS + 6)]
    bad = WARMUP_STEPS + 3  # a replayed step when graphs are on
    batches[bad][2, 1] = VOCAB - 1
    state, finite = model.init_state(B), []
    for index, batch in enumerate(batches):
        weights = [p.detach().clone() for p in model.parameters()]
        state_before = [s.clone() for s in state]
        loss, state = step(batch[:-1], batch[1:].reshape(-1), state, PhaseTimer(device, enabled=False))
        finite.append(bool(step.finite))
        unchanged = all(torch.allclose(w, p, rtol=0, atol=0, equal_nan=True)  # the poisoned row is NaN
                        for w, p in zip(weights, model.parameters(), strict=True))
        assert unchanged == (index == bad), index
        if index == bad:
            assert not torch.isfinite(loss) and all(torch.equal(a, b) for a, b in zip(state_before, state, strict=True))
    assert finite == [index != bad for index in range(len(batches))]
    if cuda_graphs:
        assert step.graphs.graph is not None


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_graph_step_matches_the_eager_step(cell):
    """Replayed steps (and the eager short last chunk) give the eager fast step's losses; dropout off so
    both draw no random numbers."""
    def losses(cuda_graphs):
        torch.manual_seed(3)
        model = RNNLM(VOCAB, ModelConfig(cell=cell, emsize=16, nhid=16, dropout=0.0)).cuda()
        step = TrainStep(model, 0.25, 20.0, cuda_graphs=cuda_graphs)
        data = torch.randint(VOCAB, (12 * T + 1 - 3, B), generator=torch.Generator().manual_seed(5)).cuda()
        state, out = model.init_state(B), []
        for epoch in range(2):
            for start in range(0, data.shape[0] - 1, T):
                length = min(T, data.shape[0] - 1 - start)
                loss, state = step(data[start:start + length], data[start + 1:start + 1 + length].reshape(-1),
                                   state, PhaseTimer("cuda"))
                out.append(loss)
            step.lr /= 4  # the schedule's change between epochs: the graph must be captured again
        return torch.stack(out).double().cpu(), step

    eager, _ = losses(False)
    graphed, step = losses(True)
    assert step.graphs.graph is not None and not step.graphs.disabled
    assert max_rel(graphed, eager) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fast_step_never_synchronises_with_the_host(cuda_graphs):
    torch.manual_seed(0)
    model = RNNLM(VOCAB, ModelConfig(emsize=16, nhid=16)).cuda()
    step = TrainStep(model, 0.25, 20.0, cuda_graphs=cuda_graphs)
    inputs, targets = torch.randint(VOCAB, (T, B), device="cuda"), torch.randint(VOCAB, (T * B,), device="cuda")
    state = model.init_state(B)
    for _ in range(WARMUP_STEPS + 1):  # warm-up and capture may synchronise, once
        _, state = step(inputs, targets, state, PhaseTimer("cuda", enabled=False))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _, state = step(inputs, targets, state, PhaseTimer("cuda", enabled=False))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_step_stays_close_to_fp32_on_cuda(cell):
    fp32, _ = run_steps(TrainStep, cell, False, steps=3, device="cuda")
    bf16, _ = run_steps(TrainStep, cell, False, steps=3, device="cuda", precision="bf16")
    assert torch.isfinite(bf16).all() and max_rel(bf16, fp32) <= 3e-2


@pytest.mark.slow
def test_validation_perplexity_matches_the_example_loop_on_wikitext2(wikitext2_dir, tmp_path):
    """A shortened `fastlm train --epochs 1` on Wikitext-2 (its 33,278-word decoder): the fast step and the
    example's loop, same seed and steps, give the same per-step losses and validation perplexity.

    At lr 20 (and still at lr 5) the first few hundred steps are chaotic: a difference of one ulp grows a
    thousandfold within 30 steps, so two float orders of the same computation go separate ways (at lr 5 the
    per-step losses here part by 1e-5 at step 30 and 1% by step 80, and validation ends 4% apart). A
    comparison there would measure the chaos, not the step, so this shortened run takes lr 2, where the
    trajectories stay together; the full epoch at lr 20 is compared in bench/README.md. Measured (80 steps,
    validation over the first 20,000 tokens of valid.txt): every step's loss within 2.3e-7, validation
    perplexity within 4.2e-8 (at 150 steps over the whole split, 2.7e-8: the shortened run loses nothing).
    """
    from fastlm.data import load_corpus
    from fastlm.train.run_folder import RunFolder
    from fastlm.train.trainer import Trainer
    from tests.helpers import quiet_display

    full = load_corpus(wikitext2_dir)
    corpus = dataclasses.replace(full, valid=full.valid[:20_000])
    config = RunConfig()
    config.update({"model": {"emsize": 32, "nhid": 32},
                   "train": {"lr": 2.0, "max_steps": 80, "log_interval": 40, "device": "cpu"}}, "test")
    config.validate()

    def run(step_name):
        losses = []
        trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(),
                          on_step=lambda step, loss: losses.append(loss.item()))
        if step_name == "example":
            trainer.step_fn = ExampleStep(trainer.model, config.train.clip, config.train.lr)
        assert type(trainer.step_fn).__name__ == {"fast": "TrainStep", "example": "ExampleStep"}[step_name]
        trainer.run = RunFolder(tmp_path / step_name)
        trainer.train_epoch()
        assert trainer.global_step == 80
        return torch.tensor(losses, dtype=torch.float64), trainer.evaluate(trainer.valid_stream, "valid")

    (fast_losses, fast), (example_losses, example) = run("fast"), run("example")
    assert max_rel(fast_losses, example_losses) <= FP32_RTOL
    # The issue asked for 1%; at lr 2 the measured gap is 4e-8, so a tighter bound catches real drift.
    assert abs(math.exp(fast - example) - 1) <= FP32_RTOL, (fast, example)


@pytest.mark.parametrize("section, values, words", [
    ("model", {"decoder": "sampled"}, "--decoder"),
    ("model", {"cutoffs": [10, 5]}, "--cutoffs"),
    ("model", {"cutoffs": [0]}, "--cutoffs"),
    ("model", {"decoder": "adaptive", "tied": True}, "--tied"),
    ("train", {"step": "slow"}, "--step"),
    ("train", {"precision": "fp16"}, "--precision"),
    ("model", {"variant": "persistent"}, "--variant persistent chooses the triton backend"),
    ("model", {"variant": "fastest"}, "--variant"),
    ("train", {"cuda_graphs": "yes"}, "cuda_graphs"),
])
def test_speed_settings_are_validated(section, values, words):
    config = RunConfig()
    config.update({section: values}, "test")
    with pytest.raises(FastlmError, match=words):
        config.validate()
