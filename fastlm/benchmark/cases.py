"""What `fastlm bench` times: one call of a recurrent stack (fwd, fwdbwd) or one training step (step).

Each builder returns a zero-argument callable doing one unit of work on fixed random inputs, built fresh
from seed 0, so every backend of a comparison starts from the same weights and data.

- fwd: the stack's forward under no_grad, x [T, B, E] and zero state, dropout 0.
- fwdbwd: forward, then backward of a fixed random cotangent on the output; parameter gradients are
  dropped between calls as a training step does.
  Both in the case's precision (bf16: the stack and its inputs in bf16; tf32: fp32 with the TF32 switches
  on, which the caller sets), launched eagerly or, with ``launch="graph"`` (CUDA), captured once as a CUDA
  graph and replayed: the graph's time is the kernels' alone, the eager one adds the host's launch work.
- step: a full training step of the RNNLM (vocabulary V), built from a RunConfig as `fastlm train` builds
  it (so lr 20 and clip 0.25 are the example's defaults) and run by the trainer's loop body, on batches of
  Zipf-distributed token ids (a word-frequency law, so the adaptive decoder sees realistic clusters),
  the hidden state carried from step to step. Backend ``example`` is the PyTorch example's step
  (fastlm.step.example, always exact fp32), ``compile-bf16`` the same under torch.compile and bf16 autocast
  (what a user gets from two lines: a second baseline); any other is the fast step on that recurrent
  backend, in the case's precision.
Every call object says how it ran (``facts()``): the dtypes the recurrence (and decoder) really ran in and,
for the step, whether a CUDA graph was captured and replayed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastlm import cells
from fastlm.cells.cudnn import runs_on_cudnn
from fastlm.config import RunConfig
from fastlm.model import RNNLM, Chunking, dtype_name
from fastlm.precision import compute_dtype
from fastlm.step import how_it_ran, make_train_step, run_step
from fastlm.step.example import CompiledBf16ExampleStep
from fastlm.step.cuda_graphs import on_current_stream_afterwards
from fastlm.timing import PhaseTimer

EXAMPLE = "example"
COMPILE_BF16 = "compile-bf16"  # the example's step under torch.compile and bf16 autocast: a second baseline
BASELINE_STEPS = (EXAMPLE, COMPILE_BF16)
LAUNCHES = ("eager", "graph")
BATCHES = 8  # distinct batches a step benchmark cycles through
GRAPH_WARMUP = 3  # eager calls on a side stream before a capture, as CUDA graph capture asks


@dataclass(frozen=True)
class Case:
    mode: str  # fwd | fwdbwd | step
    cell: str
    backend: str  # a recurrent backend, or "example" in step mode
    T: int
    B: int
    E: int
    H: int
    precision: str  # fp32 | tf32 | bf16 (fastlm.precision)
    launch: str = "eager"  # cells: eager | graph (captured once, replayed)
    variant: str = "auto"  # the triton backend's time loop: per-step | persistent | auto (others: auto)

    @property
    def suite(self) -> str:
        return "step" if self.mode == "step" else "cells"


@dataclass(frozen=True)
class StepSettings:
    """What a step case takes beyond its Case: the run configuration every case starts from (recurrent
    layers, dropout, tied weights, decoder, CUDA graphs; lr and clip stay the example's defaults), the
    vocabulary size of the random data, and an optional override of the fused loss's chunking."""

    base: RunConfig = field(default_factory=RunConfig)
    vocab: int = 33_278
    loss_chunk: Optional[tuple] = None  # (tokens, vocabulary block or 0) for the fast step's fused loss


def step_config(case: Case, settings: StepSettings, device: torch.device) -> RunConfig:
    """The validated RunConfig of a step case: the base with the case's cell, backend, sizes and precision."""
    example = case.backend in BASELINE_STEPS
    config = RunConfig.from_dict(settings.base.to_dict(), origin="bench")
    config.update({"model": {"cell": case.cell, "backend": "cudnn" if example else case.backend, "emsize": case.E,
                             "nhid": case.H, "variant": case.variant, **({"decoder": "full"} if example else {})},
                   "data": {"batch_size": case.B, "bptt": case.T},
                   "train": {"device": str(device), "step": "example" if example else "fast",
                             "precision": "fp32" if example else case.precision}}, origin="bench")
    return config.validate()


class CellsCall:
    """One fwd or fwdbwd call of a recurrent stack per call; ``facts()`` says what ran."""

    def __init__(self, case: Case, layers: int, device: torch.device):
        dtype = compute_dtype(case.precision)
        torch.manual_seed(0)
        self.layer = cells.build(case.cell, case.backend, case.E, case.H, layers, dropout=0.0,
                                 variant=case.variant).to(device, dtype)
        self.x = torch.randn(case.T, case.B, case.E, device=device, dtype=dtype,
                             requires_grad=case.mode == "fwdbwd")
        self.state = self.layer.zero_state(case.B, self.x.detach())
        self.cotangent = torch.randn(case.T, case.B, case.H, device=device, dtype=dtype)
        self.params = list(self.layer.parameters())
        self.backward = case.mode == "fwdbwd"
        self.output_dtype = None
        self.on_cudnn = None
        self.call = self.once if case.launch == "eager" else graphed(self.once)

    def once(self) -> None:
        if not self.backward:
            with torch.no_grad():
                y, _ = self.layer(self.x, self.state)
        else:
            for p in self.params:
                p.grad = None
            self.x.grad = None
            y, _ = self.layer(self.x, self.state)
            y.backward(self.cotangent)
        self.output_dtype = y.dtype
        self.on_cudnn = runs_on_cudnn(y) if self.layer.backend == "cudnn" else None

    def __call__(self) -> None:
        self.call()

    def facts(self) -> dict:
        launch_configs = getattr(self.layer, "launch_configs", None)  # the triton backend's chosen tiles
        return {"recurrence_dtype": dtype_name(self.output_dtype), "recurrence_on_cudnn": self.on_cudnn,
                "variant_ran": getattr(self.layer, "variant", None),
                **({"launch_configs": launch_configs()} if launch_configs else {})}


def graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` captured once as a CUDA graph (after warm-up calls on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with on_current_stream_afterwards():
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def build_step_call(case: Case, settings: StepSettings, device: torch.device) -> "StepCall":
    """The training step of ``case``, built as `fastlm train` builds it: RNNLM and make_train_step from the
    case's RunConfig."""
    config = step_config(case, settings, device)
    torch.manual_seed(0)
    model = RNNLM(settings.vocab, config.model).to(device)
    if settings.loss_chunk is not None and config.train.step == "fast":
        tokens, block = settings.loss_chunk
        model.loss_chunking = Chunking(tokens, block or None)
    ids = zipf_tokens(settings.vocab, BATCHES * case.T * case.B + 1, device)
    size = case.T * case.B
    batches = [(i, ids[i * size:(i + 1) * size].view(case.T, case.B), ids[i * size + 1:(i + 1) * size + 1])
               for i in range(BATCHES)]
    if case.backend == COMPILE_BF16:
        step = CompiledBf16ExampleStep(model, config.train.clip, config.train.lr)
    else:
        step = make_train_step(model, config.train)
    return StepCall(step, batches, model.init_state(case.B), PhaseTimer(device, enabled=False))


class StepCall:
    """One training step per call through ``run_step`` (the trainer's loop body), cycling through
    ``batches``; the hidden state the step returns is the one it is given next time (``state``)."""

    def __init__(self, step, batches, state, timer):
        self.step, self.batches, self.state, self.timer = step, itertools.cycle(batches), state, timer

    def __call__(self) -> None:
        _, self.state, _ = run_step(self.step, self.batches, self.state, self.timer)

    def facts(self) -> dict:
        return how_it_ran(self.step)


def zipf_tokens(vocab: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` ids with P(id = k) proportional to 1 / (k + 1): id order is frequency order."""
    generator = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=generator).to(device)
