"""What `fastlm bench` times: one call of a recurrent stack (fwd, fwdbwd) or one training step (step).

Each builder returns a zero-argument callable doing one unit of work on fixed random inputs, built fresh
from seed 0, so every backend of a comparison starts from the same weights and data.

- fwd: the stack's forward under no_grad, x [T, B, E] and zero state, dropout 0.
- fwdbwd: forward, then backward of a fixed random cotangent on the output; parameter gradients are
  dropped between calls as a training step does.
- step: a full training step of the RNNLM (vocabulary V, the example's lr 20 and clip 0.25) on batches of
  Zipf-distributed token ids (a word-frequency law, so the adaptive decoder sees realistic clusters),
  the hidden state carried from step to step. Backend ``example`` is the PyTorch example's step
  (fastlm.train.example_step, always fp32); any other is the fast step on that recurrent backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm import cells
from fastlm.config import ModelConfig
from fastlm.model.losses import Chunking
from fastlm.timing import PhaseTimer

EXAMPLE = "example"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = 8  # distinct batches a step benchmark cycles through


@dataclass(frozen=True)
class Case:
    mode: str  # fwd | fwdbwd | step
    cell: str
    backend: str  # a recurrent backend, or "example" in step mode
    T: int
    B: int
    E: int
    H: int
    dtype: str  # fp32 | bf16

    @property
    def suite(self) -> str:
        return "step" if self.mode == "step" else "cells"


@dataclass(frozen=True)
class StepSettings:
    vocab: int = 33_278
    layers: int = 2
    dropout: float = 0.2
    tied: bool = False
    decoder: str = "full"
    cuda_graphs: bool = True
    loss_chunk: Optional[tuple] = None  # (tokens, vocabulary block or 0) for the fast step's fused loss


def build_cells_call(case: Case, layers: int, device: torch.device) -> Callable[[], None]:
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    layer = cells.build(case.cell, case.backend, case.E, case.H, layers, dropout=0.0).to(device, dtype)
    x = torch.randn(case.T, case.B, case.E, device=device, dtype=dtype, requires_grad=case.mode == "fwdbwd")
    state = layer.zero_state(case.B, x.detach())
    if case.mode == "fwd":
        def forward():
            with torch.no_grad():
                layer(x, state)
        return forward
    cotangent = torch.randn(case.T, case.B, case.H, device=device, dtype=dtype)
    params = list(layer.parameters())

    def forward_backward():
        for p in params:
            p.grad = None
        x.grad = None
        y, _ = layer(x, state)
        y.backward(cotangent)
    return forward_backward


def build_step_call(case: Case, settings: StepSettings, device: torch.device) -> "StepCall":
    from fastlm.model import RNNLM
    from fastlm.train.example_step import ExampleStep
    from fastlm.train.step import TrainStep

    example = case.backend == EXAMPLE
    config = ModelConfig(cell=case.cell, backend="cudnn" if example else case.backend, emsize=case.E,
                         nhid=case.H, nlayers=settings.layers, dropout=settings.dropout, tied=settings.tied,
                         decoder="full" if example else settings.decoder)
    torch.manual_seed(0)
    model = RNNLM(settings.vocab, config).to(device)
    if example:
        step = ExampleStep(model, clip=0.25, lr=20.0)
    else:
        if settings.loss_chunk is not None:
            tokens, block = settings.loss_chunk
            model.loss_chunking = Chunking(tokens, block or None)
        step = TrainStep(model, clip=0.25, lr=20.0, amp="bf16" if case.dtype == "bf16" else "off",
                         cuda_graphs=settings.cuda_graphs)
    ids = zipf_tokens(settings.vocab, BATCHES * case.T * case.B + 1, device)
    batches = [(ids[i * case.T * case.B:(i + 1) * case.T * case.B].view(case.T, case.B),
                ids[i * case.T * case.B + 1:(i + 1) * case.T * case.B + 1]) for i in range(BATCHES)]
    return StepCall(step, batches, model.init_state(case.B), PhaseTimer(device, enabled=False))


class StepCall:
    """One training step per call, cycling through ``batches``; the hidden state the step returns is the one
    it is given next time (``state``), as in training."""

    def __init__(self, step, batches, state, timer):
        self.step, self.batches, self.state, self.timer = step, batches, state, timer
        self.calls = 0

    def __call__(self) -> None:
        inputs, targets = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        _, self.state = self.step(inputs, targets, self.state, self.timer)


def zipf_tokens(vocab: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` ids with P(id = k) proportional to 1 / (k + 1): id order is frequency order."""
    generator = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=generator).to(device)
