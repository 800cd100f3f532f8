"""The precision setting: fp32 exact, tf32 switches, bf16 decoder GEMMs with everything else in fp32, auto."""

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
def test_bf16_runs_the_decoder_in_bf16_and_keeps_the_rest_fp32(cell, backend):
    model, step = make(cell, backend=backend)
    losses, state = train(step, model, batches(4))
    ran = how_it_ran(step)
    assert (ran["precision"], ran["embedding_dtype"], ran["recurrence_dtype"], ran["decoder_dtype"],
            ran["loss_dtype"]) == ("bf16", "float32", "float32", "bfloat16", "float32")
    from fastlm.model.cpu_kernels import native_gemm_reason, native_missing_reason

    assert ran["native_loss_kernel"] == (native_missing_reason() is None)
    assert ran["native_gemm"] == (native_gemm_reason() is None) and ran["native_gemm_note"] == native_gemm_reason()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s.dtype == torch.float32 for s in (state if isinstance(state, tuple) else (state,)))
    # The model's own weights are the ones that train: gradients dropped after the update, values moved.
    assert all(p.grad is None for p in model.parameters())
    fp32_model, fp32_step = make(cell, backend=backend, precision="fp32")
    fp32_losses, _ = train(fp32_step, fp32_model, batches(4))
    assert how_it_ran(fp32_step)["decoder_dtype"] == "float32"
    # bf16 rounds to 3 significant digits: the losses of a few steps agree to ~1e-2, not to float noise.
    assert max(abs(a - b) / b for a, b in zip(losses, fp32_losses)) <= 2e-2
    assert losses != fp32_losses  # and it did compute in bf16 (an fp32 run would match to 1e-6)
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), fp32_model.parameters())]
    assert max(moved) <= 5e-3  # the weights took nearly the same steps


def test_bf16_update_is_fp32_sgd_on_the_bf16_decoder_gradient():
    """One step: the weights move by -lr * (the gradient of a loss whose decoder product is taken from bf16
    casts, clipped), computed here in plain PyTorch; the fused loss differs only by rounding its gradients to
    bf16 before the dh and dW GEMMs."""
    model, step = make(precision="bf16")
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = batches(1)[0]
    hidden, _ = model(inputs, model.init_state(B))
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = flat.bfloat16().float() @ model.decoder.weight.bfloat16().float().t() + model.decoder.bias
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), list(model.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, 0.25 / (norm.item() + 1e-6))
    step(inputs, targets, model.init_state(B), PhaseTimer("cpu", enabled=False))
    for p, b, g in zip(model.parameters(), before, grads):
        expected = b - 1.0 * scale * g
        # Allowed: one bf16 rounding (unit roundoff 2^-8) of the largest entry of the gradient.
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2.0 ** -8 * g.abs().max().item())


def test_bf16_step_computes_with_weights_loaded_into_the_model():
    """A checkpoint loaded between steps (resume, the best model) is what the next step computes with."""
    model, step = make(precision="bf16")
    train(step, model, batches(2))
    other, _ = make(precision="fp32", seed=5)
    model.load_state_dict(other.state_dict())
    fresh_model, fresh_step = make(precision="bf16", seed=5)
    data = batches(1, seed=9)
    assert train(step, model, data)[0] == train(fresh_step, fresh_model, data)[0]


def test_bf16_keeps_tied_weights_tied_and_trains_them_as_fp32_does():
    model, step = make(tied=True)
    fp32_model, fp32_step = make(tied=True, precision="fp32")
    losses, _ = train(step, model, batches(3))
    fp32_losses, _ = train(fp32_step, fp32_model, batches(3))
    assert model.encoder.weight is model.decoder.weight
    assert max(abs(a - b) / b for a, b in zip(losses, fp32_losses)) <= 2e-2
    assert (model.encoder.weight - fp32_model.encoder.weight).abs().max().item() <= 5e-3


def test_fp32_step_reports_fp32_everywhere():
    model, step = make(precision="fp32")
    assert step.decoder_dtype == torch.float32
    train(step, model, batches(1))
    ran = how_it_ran(step)
    assert (ran["recurrence_dtype"], ran["decoder_dtype"], ran["cuda_graphs_requested"]) == ("float32", "float32",
                                                                                            False)
    assert not ran["native_loss_kernel"] and "fp32" in ran["native_loss_kernel_note"]
    assert not ran["native_gemm"] and ran["native_gemm_note"] == ran["native_loss_kernel_note"]


def test_auto_precision_follows_the_cpus_bf16_units(monkeypatch):
    import fastlm.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.resolve_precision("auto", torch.device("cpu")) == ("bf16", "auto: this CPU has AVX512-BF16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    ran, why = precision.resolve_precision("auto", torch.device("cpu"))
    assert ran == "fp32" and "neither AMX-BF16 nor AVX512-BF16" in why
    assert precision.resolve_precision("bf16", torch.device("cpu")) == ("bf16", None)
    model, step = make(precision="auto")
    assert (step.precision, step.precision_asked) == ("fp32", "auto")
    assert how_it_ran(step)["precision_reason"] == why


def test_auto_turns_tf32_off(restore_tf32):
    """auto resolves to bf16 or fp32, both exact about TF32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_precision("auto")
    assert tf32_flags() == {"matmul_tf32": False, "cudnn_tf32": False}


def test_auto_precision_on_cuda_reads_the_compute_capability(monkeypatch):
    import fastlm.precision as precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert precision.resolve_precision("auto", torch.device("cuda")) == (
        "bf16", "auto: compute capability 9.0 has bf16 tensor cores")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert precision.resolve_precision("auto", torch.device("cuda"))[0] == "fp32"


QUALITY_STEPS, QUALITY_EVAL_BATCHES = 300, 200
# Validation snapshots over the last third of the run: every SNAPSHOT_EVERY steps from step 205 on, each on the
# first SNAPSHOT_BATCHES batches of valid (7,000 tokens; the same batches for both precisions).
SNAPSHOT_EVERY, SNAPSHOT_FROM, SNAPSHOT_BATCHES = 5, 205, 20


class _SnapshottingStep:
    """The trainer's step, plus a validation loss every SNAPSHOT_EVERY steps from SNAPSHOT_FROM on. Evaluation
    runs under no_grad in eval mode and draws no random numbers, so the run trains exactly as without it."""

    def __init__(self, trainer):
        self.trainer, self.inner, self.steps, self.losses = trainer, trainer.step_fn, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.steps += 1
        if self.steps >= SNAPSHOT_FROM and (self.steps - SNAPSHOT_FROM) % SNAPSHOT_EVERY == 0:
            trainer = self.trainer
            self.losses.append(trainer.evaluate(trainer.valid_stream, "valid", batches=SNAPSHOT_BATCHES))
        return out


def _validation_after_300_steps(corpus, tmp_path, device, cell, precision):
    """The example's model (2x200) trained 300 steps at lr 2 from seed 1111 on Wikitext-2. Returns (validation
    perplexity at step 300 on the first QUALITY_EVAL_BATCHES batches of valid, the perplexity of the mean
    validation loss of the snapshots over steps 205-300)."""
    from fastlm.train.run_folder import RunFolder
    from fastlm.train.trainer import Trainer
    from tests.helpers import quiet_display

    config = RunConfig()
    config.update({"model": {"cell": cell},
                   "train": {"lr": 2.0, "max_steps": QUALITY_STEPS, "log_interval": 100, "device": device,
                             "precision": precision, "eval_batches": QUALITY_EVAL_BATCHES}}, "test")
    trainer = Trainer(config.validate(), corpus, torch.device(device), quiet_display())
    trainer.run = RunFolder(tmp_path / f"{cell}-{precision}")
    snapshots = trainer.step_fn = _SnapshottingStep(trainer)
    trainer.train_epoch()
    assert trainer.global_step == QUALITY_STEPS and len(snapshots.losses) == 20
    ran = how_it_ran(snapshots.inner)
    assert ran["decoder_dtype"] == ("bfloat16" if precision == "bf16" else "float32")
    assert ran["recurrence_dtype"] == "float32"
    assert ran["matmul_tf32"] == ran["cudnn_tf32"] == (precision == "tf32")
    return (math.exp(trainer.evaluate(trainer.valid_stream, "valid")),
            math.exp(sum(snapshots.losses) / len(snapshots.losses)))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four 300-step runs: ~2-3 minutes each on a quiet 2-core CPU, far more on a busy one
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_trains_the_same_model_on_cpu(wikitext2_dir, tmp_path, cell):
    """bf16 keeps the model: validation perplexity within 1% of exact fp32's after 300 steps (runs in CI).

    Measured as the mean validation loss of 20 snapshots over steps 205-300, not at step 300 alone: at lr 2 the
    model still oscillates, and fp32's own validation perplexity on these batches moves by up to 7% from one step
    to the next near step 300 (1292 at step 299, 1253 at 300 for the LSTM). bf16's rounding shifts the phase of
    that oscillation, so one snapshot compares phases, not models (bench/README.md, "bf16 quality"). The step-300
    figures are printed beside the asserted ones."""
    from fastlm.data import load_corpus

    corpus = load_corpus(wikitext2_dir)
    exact, exact_mean = _validation_after_300_steps(corpus, tmp_path, "cpu", cell, "fp32")
    low, low_mean = _validation_after_300_steps(corpus, tmp_path, "cpu", cell, "bf16")
    print(f"{cell}: validation ppl at step {QUALITY_STEPS}: fp32 {exact:.2f}, bf16 {low:.2f} ({low / exact - 1:+.2%}); "
          f"over steps {SNAPSHOT_FROM}-{QUALITY_STEPS}: fp32 {exact_mean:.2f}, bf16 {low_mean:.2f} "
          f"({low_mean / exact_mean - 1:+.2%})")
    assert abs(low_mean / exact_mean - 1) <= 0.01, (exact_mean, low_mean)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_run_ends_within_one_percent_of_fp32(wikitext2_dir, tmp_path, precision, restore_tf32):
    """The same on CUDA, for tf32 and bf16 (LSTM)."""
    from fastlm.data import load_corpus

    corpus = load_corpus(wikitext2_dir)
    exact, exact_mean = _validation_after_300_steps(corpus, tmp_path, "cuda", "lstm", "fp32")
    low, low_mean = _validation_after_300_steps(corpus, tmp_path, "cuda", "lstm", precision)
    print(f"validation ppl at step {QUALITY_STEPS}: fp32 {exact:.2f}, {precision} {low:.2f}; over steps "
          f"{SNAPSHOT_FROM}-{QUALITY_STEPS}: fp32 {exact_mean:.2f}, {precision} {low_mean:.2f}")
    assert abs(low_mean / exact_mean - 1) <= 0.01, (exact_mean, low_mean)


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
