"""The precision setting: fp32 exact, tf32 switches, bf16 computed in a cast copy with fp32 master weights."""

import dataclasses
import math

import pytest
import torch

from fastlm.config import ModelConfig, RunConfig
from fastlm.model import RNNLM
from fastlm.precision import compute_dtype, tf32_flags, use_precision
from fastlm.step import TrainStep, how_it_ran
from fastlm.timing import PhaseTimer

VOCAB, T, B = 50, 6, 3


@pytest.fixture
def restore_tf32():
    saved = tf32_flags()
    yield
    use_precision("fp32")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved.values()


@pytest.mark.parametrize("precision, on", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_use_precision_sets_both_tf32_switches(restore_tf32, precision, on):
    torch.backends.cuda.matmul.allow_tf32 = not on
    torch.backends.cudnn.allow_tf32 = not on
    use_precision(precision)
    assert tf32_flags() == {"matmul_tf32": on, "cudnn_tf32": on}
    assert compute_dtype(precision) == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_use_precision_refuses_unknown_names():
    with pytest.raises(ValueError, match="fp32, tf32, bf16"):
        use_precision("fp16")


def make(cell="lstm", tied=False, backend="cudnn", precision="bf16", seed=0):
    torch.manual_seed(seed)
    model = RNNLM(VOCAB, ModelConfig(cell=cell, backend=backend, emsize=8, nhid=8, dropout=0.0, tied=tied))
    return model, TrainStep(model, 0.25, 1.0, precision=precision)


def batches(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(VOCAB, (T, B), generator=g), torch.randint(VOCAB, (T * B,), generator=g))
            for _ in range(count)]


def train(step, model, data):
    state, timer, losses = model.init_state(B), PhaseTimer("cpu", enabled=False), []
    for inputs, targets in data:
        loss, state = step(inputs, targets, state, timer)
        losses.append(loss.item())
    return losses, state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cudnn", "reference"])
def test_bf16_computes_in_bf16_and_keeps_fp32_masters(cell, backend):
    model, step = make(cell, backend=backend)
    losses, state = train(step, model, batches(4))
    ran = how_it_ran(step)
    assert (ran["precision"], ran["recurrence_dtype"], ran["decoder_dtype"]) == ("bf16", "bfloat16", "bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(w.dtype == torch.bfloat16 for w in step.low_precision.weights)
    assert all(s.dtype == torch.bfloat16 for s in (state if isinstance(state, tuple) else (state,)))
    # The masters are the weights that train: gradients dropped after the update, values moved.
    assert all(p.grad is None for p in model.parameters())
    fp32_model, fp32_step = make(cell, backend=backend, precision="fp32")
    fp32_losses, _ = train(fp32_step, fp32_model, batches(4))
    assert how_it_ran(fp32_step)["recurrence_dtype"] == "float32"
    # bf16 rounds to 3 significant digits: the losses of a few steps agree to ~1e-2, not to float noise.
    assert max(abs(a - b) / b for a, b in zip(losses, fp32_losses)) <= 2e-2
    assert losses != fp32_losses  # and it did compute in bf16 (an fp32 run would match to 1e-6)
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), fp32_model.parameters())]
    assert max(moved) <= 5e-3  # the masters took nearly the same steps


def test_bf16_update_lands_on_the_fp32_masters_exactly():
    """One step: the masters move by -lr * (the bf16 gradient widened to fp32, clipped), in fp32."""
    model, step = make(precision="bf16")
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = batches(1)[0]
    copy = step.low_precision
    copy.sync_weights()
    hidden, _ = copy.compute(inputs, copy.state(model.init_state(B)))
    copy.compute.loss(hidden, targets).backward()
    grads = [w.grad.float() for w in copy.weights]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, 0.25 / (norm.item() + 1e-6))
    for w in copy.weights:
        w.grad = None
    step(inputs, targets, model.init_state(B), PhaseTimer("cpu", enabled=False))
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 1.0 * scale * g, rtol=0, atol=1e-6)


def test_bf16_copy_sees_weights_loaded_into_the_masters():
    """A checkpoint loaded between steps (resume, the best model) is what the next step computes with."""
    model, step = make(precision="bf16")
    train(step, model, batches(2))
    other, _ = make(precision="fp32", seed=5)
    model.load_state_dict(other.state_dict())
    fresh_model, fresh_step = make(precision="bf16", seed=5)
    data = batches(1, seed=9)
    assert train(step, model, data)[0] == train(fresh_step, fresh_model, data)[0]


def test_bf16_copy_keeps_tied_weights_tied_and_follows_train_mode():
    model, step = make(tied=True)
    compute = step.low_precision.compute
    assert compute.encoder.weight is compute.decoder.weight
    assert len(step.low_precision.weights) == len(list(model.parameters()))
    model.eval()
    step.low_precision.sync_weights()
    assert not compute.training


def test_fp32_step_has_no_copy_and_reports_fp32():
    model, step = make(precision="fp32")
    assert step.low_precision is None and step.compute_model is model
    train(step, model, batches(1))
    ran = how_it_ran(step)
    assert (ran["recurrence_dtype"], ran["decoder_dtype"], ran["cuda_graphs_requested"]) == ("float32", "float32",
                                                                                            False)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_run_ends_within_one_percent_of_fp32(wikitext2_dir, tmp_path, precision, restore_tf32):
    """300 steps at lr 2 of the example's model on Wikitext-2, on CUDA: validation perplexity of the tf32 or
    bf16 run within 1% of the exact fp32 run's (lr 2, where trajectories do not diverge chaotically)."""
    from fastlm.data import load_corpus
    from fastlm.train.run_folder import RunFolder
    from fastlm.train.trainer import Trainer
    from tests.helpers import quiet_display

    corpus = load_corpus(wikitext2_dir)

    def validation_ppl(name):
        config = RunConfig()
        config.update({"train": {"lr": 2.0, "max_steps": 300, "log_interval": 100, "device": "cuda",
                                 "precision": name}}, "test")
        trainer = Trainer(config.validate(), corpus, torch.device("cuda"), quiet_display())
        trainer.run = RunFolder(tmp_path / name)
        trainer.train_epoch()
        assert trainer.global_step == 300
        ran = how_it_ran(trainer.step_fn)
        want = "bfloat16" if name == "bf16" else "float32"
        assert (ran["recurrence_dtype"], ran["decoder_dtype"]) == (want, want)
        assert ran["matmul_tf32"] == ran["cudnn_tf32"] == (name == "tf32")
        return math.exp(trainer.evaluate(trainer.valid_stream, "valid"))

    exact, low = validation_ppl("fp32"), validation_ppl(precision)
    print(f"validation ppl after 300 steps: fp32 {exact:.3f}, {precision} {low:.3f}")
    assert abs(low / exact - 1) <= 0.01, (exact, low)


def test_precision_is_a_run_setting():
    config = RunConfig()
    assert config.train.precision == "fp32"
    assert dataclasses.asdict(config.validate())["train"]["precision"] == "fp32"


@pytest.mark.parametrize("amp, precision", [("off", "fp32"), ("bf16", "bf16")])
def test_a_configuration_saved_before_precision_existed_still_loads(amp, precision):
    """Checkpoints of older runs carry train.amp: they resume and generate with the matching precision."""
    stored = RunConfig().to_dict()
    del stored["train"]["precision"]
    stored["train"]["amp"] = amp
    assert RunConfig.from_dict(stored, origin="old checkpoint").validate().train.precision == precision


def test_cudnn_use_is_read_from_the_autograd_record():
    from fastlm.cells.cudnn import runs_on_cudnn

    lstm = torch.nn.LSTM(4, 4)
    y, _ = lstm(torch.randn(3, 2, 4))
    assert runs_on_cudnn(y) is None  # a CPU tensor: not a question cuDNN answers


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cudnn_use_is_observed_on_cuda(dtype):
    """fp32 runs on cuDNN; bf16 does where torch was built with cuDNN 9.13+ on an Ampere or later GPU, and
    the answer is read from what ran, either way; under no_grad there is nothing to read."""
    from fastlm.cells.cudnn import runs_on_cudnn

    lstm = torch.nn.LSTM(8, 8).cuda().to(dtype)
    x = torch.randn(3, 2, 8, device="cuda", dtype=dtype, requires_grad=True)
    on_cudnn = runs_on_cudnn(lstm(x)[0])
    assert on_cudnn is True if dtype == torch.float32 else isinstance(on_cudnn, bool)
    with torch.no_grad():
        assert runs_on_cudnn(lstm(x)[0]) is None
