"""--optimizer adamw: torch's AdamW on the fp32 weights, against a plain PyTorch loop; its state in checkpoints, so a
paused run resumes step for step; a skipped step leaves moments and step counts alone; the flags, one way each."""

import json

import pytest
import torch
import torch.nn.functional as F

from fastlm.config import ModelConfig
from fastlm.model import RNNLM, detach_state
from fastlm.step import how_it_ran
from fastlm.step.example import ExampleStep
from fastlm.step.fast import TrainStep
from fastlm.step.optimizer import OptimizerSpec, load_state
from fastlm.sweep.grid import Grid, add_setting, points
from fastlm.timing import PhaseTimer
from fastlm.train.command import resume_config
from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer
from tests.helpers import one_line_error, quiet_display, run_cli, small_config, toy_corpus

VOCAB, T, B, STEPS = 60, 7, 4, 5
# A large lr and weight decay, betas unlike torch's: a dropped or misplaced setting moves the weights by far more
# than the fp32 rule (1e-5 relative) allows.
SPEC = OptimizerSpec("adamw", weight_decay=0.1, betas=(0.8, 0.95))
LR = 0.01


def batches():
    data = torch.randint(VOCAB, (STEPS * T + 1, B), generator=torch.Generator().manual_seed(5))
    return [(data[i:i + T], data[i + 1:i + 1 + T].reshape(-1)) for i in range(0, STEPS * T, T)]


def new_model(cell="lstm", tied=False):
    torch.manual_seed(3)
    return RNNLM(VOCAB, ModelConfig(cell=cell, emsize=16, nhid=16, dropout=0.0, tied=tied))


def reference_adamw(model):
    """The plain PyTorch loop: log_softmax + NLL over the full logits, clip, torch's for-loop AdamW."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, betas=SPEC.betas, weight_decay=SPEC.weight_decay, foreach=False)
    state = model.init_state(B)
    for inputs, targets in batches():
        optimizer.zero_grad()
        hidden, state = model(inputs, detach_state(state))
        F.nll_loss(F.log_softmax(model.decode(hidden), dim=1), targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        optimizer.step()
    return model.state_dict()


def run(step, model):
    state = model.init_state(B)
    for inputs, targets in batches():
        _, state = step(inputs, targets, state, PhaseTimer("cpu", enabled=False))
    return model.state_dict()


@pytest.mark.parametrize("cell, tied", [("lstm", False), ("gru", True)])
def test_the_fast_steps_adamw_is_plain_pytorchs(cell, tied):
    expected = reference_adamw(new_model(cell, tied))
    model = new_model(cell, tied)
    step = TrainStep(model, 0.25, LR, optimizer=SPEC)
    assert how_it_ran(step)["optimizer"] == "adamw" and how_it_ran(step)["optimizer_impl"] == "fused"
    got = run(step, model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_examples_step_with_use_optimizer_is_plain_pytorchs():
    expected = reference_adamw(new_model())
    model = new_model()
    got = run(ExampleStep(model, 0.25, LR, optimizer=SPEC), model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_in_bf16_the_moments_are_fp32_and_belong_to_the_master_weights():
    model = new_model()
    step = TrainStep(model, 0.25, LR, precision="bf16", optimizer=SPEC)
    run(step, model)
    masters = list(model.parameters())
    assert set(step.optimizer.state) == set(masters)
    for p in masters:
        assert p.dtype == step.optimizer.state[p]["exp_avg"].dtype == step.optimizer.state[p]["exp_avg_sq"].dtype \
            == torch.float32


def test_a_skipped_adamw_step_leaves_weights_moments_and_step_counts_alone():
    """A NaN embedding row that only the third batch reads: that step is skipped on the device (fused AdamW's
    found_inf), so its moments and step count stay as they were; the steps around it update all three."""
    model = new_model()
    with torch.no_grad():
        model.encoder.weight[VOCAB - 1] = float("nan")
    step = TrainStep(model, 0.25, LR, skip_nonfinite=True, optimizer=SPEC)
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(VOCAB - 1, (T + 1, B), generator=generator) for _ in range(5)]
    bad = 2
    data[bad][2, 1] = VOCAB - 1
    state = model.init_state(B)
    for index, batch in enumerate(data):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in step.optimizer.state.items()}
        _, state = step(batch[:-1], batch[1:].reshape(-1), state, PhaseTimer("cpu", enabled=False))
        assert bool(step.finite) == (index != bad)
        same_weights = all(torch.equal(before[name].nan_to_num(), p.nan_to_num())
                           for name, p in model.named_parameters())
        same_moments = bool(moments) and all(torch.equal(moments[id(p)][k], v)
                                             for p, s in step.optimizer.state.items() for k, v in s.items())
        assert same_weights == same_moments == (index == bad), index
    assert int(step.optimizer.state[model.decoder.weight]["step"]) == len(data) - 1


@pytest.mark.gpu
def test_adamw_captured_in_a_cuda_graph_trains_the_eager_steps_weights():
    """Graphed steps replay the fused AdamW update (capturable); an lr change drops and recaptures the graph."""
    results = []
    for graphs in (False, True):
        model = new_model().cuda()
        step = TrainStep(model, 0.25, LR, cuda_graphs=graphs, optimizer=SPEC)
        state = model.init_state(B)
        for index, (inputs, targets) in enumerate(batches() * 2):
            if index == 6:
                step.lr /= 4
            _, state = step(inputs.cuda(), targets.cuda(), state, PhaseTimer("cuda", enabled=False))
        results.append((model.state_dict(), step))
    (eager, _), (graphed, step) = results
    assert step.graphs.replays > 0 and step.graphs.captures == 2
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ stop and resume

CORPUS = toy_corpus(lines=(150, 40, 40))  # 15 batches an epoch at batch 8, bptt 12


def adamw_config(**train):
    """Dropout on (the RNG must resume too); AdamW with its moments well away from zero by the pause."""
    return small_config(model={"dropout": 0.2}, train={"epochs": 2, "lr": 3e-3, "optimizer": "adamw", **train})


def train(config, folder, resume=False):
    losses = []
    if resume:
        config, payload, _ = resume_config(folder, {})
    trainer = Trainer(config, CORPUS, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: losses.append(loss.item()))
    if resume:
        trainer.restore(payload, folder / "last.pt")
    trainer.fit(RunFolder(folder))
    return losses, trainer


def test_an_adamw_run_paused_and_resumed_is_the_uninterrupted_run_step_for_step(tmp_path):
    full_losses, full = train(adamw_config(), tmp_path / "full")
    first, _ = train(adamw_config(max_steps=7), tmp_path / "split")
    second, split = train(None, tmp_path / "split", resume=True)
    assert first + second == full_losses
    for name, value in full.model.state_dict().items():
        assert torch.equal(split.model.state_dict()[name], value), name
    full_state, split_state = full.step_fn.optimizer.state_dict(), split.step_fn.optimizer.state_dict()
    for index, moments in full_state["state"].items():
        for key, value in moments.items():
            assert torch.equal(split_state["state"][index][key], value), (index, key)
    assert results(tmp_path / "split") == results(tmp_path / "full")


def results(folder):
    """The epochs' validation and the test of the best model, without their timings."""
    lines = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in lines if r["kind"] in ("epoch", "test")]


# ------------------------------------------------------------------------------------------ flags

def test_use_optimizer_is_the_examples_spelling_of_optimizer_adamw(tmp_path):
    from fastlm.cli import build_parser, config_from_args

    for flags in (["--use-optimizer"], ["--optimizer", "adamw"]):
        config = config_from_args(build_parser().parse_args(["train", *flags]))
        assert config.train.optimizer == "adamw"
    assert config_from_args(build_parser().parse_args(["train"])).train.optimizer == "sgd"


@pytest.mark.parametrize("flags, words", [
    (["--optimizer", "adam"], "invalid choice"),
    (["--betas", "0.9,0.99"], "--betas are AdamW's"),
    (["--optimizer", "adamw", "--betas", "0.9,1.5"], "two numbers in [0, 1)"),
    (["--optimizer", "adamw", "--betas", "0.9"], "two comma-separated numbers"),
    (["--weight-decay", "-1"], "--weight-decay must be"),
])
def test_bad_optimizer_flags_are_one_line_errors(flags, words, tmp_path):
    status, _, err = run_cli("train", "--data", "generated", "--dry-run", "--run-dir", tmp_path / "run", *flags)
    assert words in one_line_error(status, err)
    assert not (tmp_path / "run").exists()


def test_a_sweep_can_vary_the_optimizer():
    grid = Grid(cells=["lstm"])
    add_setting(grid, "optimizer=sgd,adamw")
    add_setting(grid, "lr=20,0.001")
    configs = [point.config(small_config(), {}) for point in points(grid.check())]
    assert [(c.train.optimizer, c.train.lr) for c in configs] == [("sgd", 20.0), ("sgd", 0.001), ("adamw", 20.0),
                                                                  ("adamw", 0.001)]


def test_sgd_with_weight_decay_is_torchs_sgd():
    """--weight-decay with sgd: torch's SGD (L2 added to the gradient), fused, against its for-loop kernels."""
    model, reference_model = new_model(), new_model()
    reference = torch.optim.SGD(list(reference_model.parameters()), lr=0.5, weight_decay=0.1, foreach=False)
    step = TrainStep(model, 0.25, 0.5, optimizer=OptimizerSpec("sgd", weight_decay=0.1))
    assert how_it_ran(step)["optimizer_impl"] == "fused" and how_it_ran(step)["weight_decay"] == 0.1
    state = reference_model.init_state(B)
    for inputs, targets in batches():
        reference.zero_grad()
        hidden, state = reference_model(inputs, detach_state(state))
        F.nll_loss(F.log_softmax(reference_model.decode(hidden), dim=1), targets).backward()
        torch.nn.utils.clip_grad_norm_(list(reference_model.parameters()), 0.25)
        reference.step()
    got = run(step, model)
    for name, value in reference_model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoints_optimizer_state_keeps_this_devices_kernels():
    """A run saved where AdamW ran other kernels (foreach, or capturable under CUDA graphs) resumes here with this
    device's (fused on CPU), and the same moments and step counts."""
    model = new_model()
    elsewhere = torch.optim.AdamW(list(model.parameters()), lr=LR, foreach=True, capturable=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    elsewhere.step()
    saved = elsewhere.state_dict()
    saved["param_groups"][0]["capturable"] = True  # as a CUDA-graphed run saves it
    step = TrainStep(model, 0.25, LR, optimizer=SPEC)
    load_state(step.optimizer, saved)
    group = step.optimizer.param_groups[0]
    assert group["fused"] and not group["foreach"] and not group["capturable"]
    for p in model.parameters():
        assert torch.equal(step.optimizer.state[p]["exp_avg"], elsewhere.state[p]["exp_avg"])
