"""The training step: what one batch does (forward, backward, clip, update), built one way and run one way.

`fastlm train`, `fastlm bench` and `fastlm profile` all build their step with ``make_train_step`` from a
RunConfig and run it with ``run_step``, so the three measure the same work. The step a configuration asks
for is ``TrainStep`` (fastlm.step.fast), the fast one and the default, or ``ExampleStep``
(fastlm.step.example), the PyTorch example's loop as it is, the baseline of every speed-up. On CUDA the fast
step replays fixed-shape steps as a CUDA graph (fastlm.step.cuda_graphs).
"""

from __future__ import annotations

from fastlm.distributed import SINGLE, World
from fastlm.errors import FastlmError
from fastlm.model import RNNLM
from fastlm.precision import tf32_flags
from fastlm.step.example import ExampleStep
from fastlm.step.fast import TrainStep
from fastlm.step.optimizer import OptimizerSpec
from fastlm.step.optimizer import describe as describe_optimizer
from fastlm.timing import DATA, PhaseTimer, active_timer

__all__ = ["ExampleStep", "TrainStep", "make_train_step", "run_step", "how_it_ran"]


def make_train_step(model: RNNLM, train_config, world: World = SINGLE) -> TrainStep | ExampleStep:
    """The step ``train_config.step`` names: "fast" (TrainStep, with its precision, cuda_graphs and
    skip_nonfinite) or "example". The TF32 switches of the precision are the caller's to set
    (fastlm.precision.use_precision), being process-wide."""
    if train_config.step == "example":
        if world.size > 1:
            raise FastlmError("--step example is the PyTorch example's loop in one process; use --step fast with "
                              "several processes")
        return ExampleStep(model, train_config.clip, train_config.lr, precision=train_config.precision,
                           optimizer=OptimizerSpec.of(train_config))
    return TrainStep(model, train_config.clip, train_config.lr, precision=train_config.precision,
                     cuda_graphs=train_config.cuda_graphs, skip_nonfinite=train_config.skip_nonfinite > 0,
                     world=world, optimizer=OptimizerSpec.of(train_config))


def run_step(step_fn, batches, state, timer: PhaseTimer):
    """One training step as fastlm runs every one (train, profile and bench alike): the next batch of
    ``batches`` (an iterator of (index, inputs, targets)) is taken inside the DATA phase, then ``step_fn`` runs
    with ``timer`` active, so the model reports its parts (embedding, rnn, decoder, loss) to it.

    Returns (the loss as a device tensor, the new hidden state for the next step, the batch's target count).
    """
    with timer.step():
        with timer.phase(DATA):
            _, inputs, targets = next(batches)
        with active_timer(timer):
            loss, state = step_fn(inputs, targets, state, timer)
    return loss, state, targets.numel()


def how_it_ran(step_fn) -> dict:
    """What a step really did, for bench rows and profiles: the precision asked for, the dtypes its embedding,
    recurrence and decoder GEMMs last ran in (the softmax and loss are always fp32), whether the native CPU loss
    kernel ran (and why not), both TF32 switches as they stand, whether a CUDA graph was captured and how
    many steps were replays (with the reason when graphs were asked for and not used), and the optimizer
    with its kernels (fastlm.step.optimizer.describe)."""
    graphs = getattr(step_fn, "graphs", None)
    requested = graphs is not None or getattr(step_fn, "graphs_skipped", None) is not None
    note = getattr(step_fn, "graphs_skipped", None) or (graphs.failure if graphs is not None else None)
    ran_in = step_fn.model.ran_in
    return {"precision": step_fn.precision, "precision_asked": getattr(step_fn, "precision_asked", step_fn.precision),
            "precision_reason": getattr(step_fn, "precision_reason", None), "embedding_dtype": ran_in.get("embedding"),
            "recurrence_dtype": ran_in.get("recurrence"),
            "recurrence_on_cudnn": ran_in.get("recurrence_on_cudnn"),
            "variant_ran": getattr(step_fn.model.rnn, "variant", None),
            "decoder_dtype": ran_in.get("decoder"), "loss_dtype": "float32", **native_loss_kernel(step_fn),
            **tf32_flags(), "cuda_graphs_requested": requested,
            "cuda_graph_captures": graphs.captures if graphs is not None else 0,
            "cuda_graph_replays": graphs.replays if graphs is not None else 0, "cuda_graph_note": note,
            **describe_optimizer(step_fn.optimizer, step_fn.plain_sgd)}


def native_loss_kernel(step_fn) -> dict:
    """Whether the fused loss ran the native CPU kernels, the loss kernel and the fp32-output bf16 GEMM of the
    gradients: only the fast step in bf16 on CPU with the full decoder takes them (fastlm.model.cpu_kernels);
    otherwise the reason (the GEMM also needs AVX512-BF16)."""
    from fastlm.model.cpu_kernels import native_gemm_reason, native_missing_reason

    model = step_fn.model
    if not isinstance(step_fn, TrainStep) or step_fn.precision != "bf16":
        why = "the exact fp32 loss runs ATen's kernels"
    elif model.adaptive:
        why = "the adaptive decoder has a loss of its own"
    elif step_fn.device.type != "cpu":
        why = f"on {step_fn.device.type} the PyTorch path runs"
    else:
        why = native_missing_reason()
    gemm_why = why if why is not None else native_gemm_reason()
    return {"native_loss_kernel": why is None, "native_loss_kernel_note": why,
            "native_gemm": gemm_why is None, "native_gemm_note": gemm_why}


def precision_line(step_fn) -> str:
    """The run header's line on precision: what runs in which dtype, and why when ``auto`` chose."""
    ran = step_fn.precision
    parts = {"fp32": "exact fp32 throughout (TF32 off)",
             "tf32": "fp32 tensors, GEMMs and the recurrence may use TF32",
             "bf16": "decoder GEMMs in bf16 (fp32 accumulation); embedding, recurrence, softmax, dh, dW, "
                     "weights and update in fp32"}[ran]
    reason = getattr(step_fn, "precision_reason", None)
    return f"precision {ran}: {parts}" + (f" ({reason})" if reason else "")
