"""The PyTorch word_language_model example's training step, as it is: the baseline of every speed-up.

Per batch the example does ``model.zero_grad()``, forward through torch.nn (embedding, dropout, LSTM/GRU,
dropout, Linear), ``log_softmax`` over the full [tokens x vocabulary] output and ``nll_loss``, backward,
``clip_grad_norm_``, a Python loop ``p.data.add_(p.grad, alpha=-lr)`` over the parameters, and
``total_loss += loss.item()``, a host synchronisation every step. This class does exactly that on an
RNNLM built with the cudnn backend and the full decoder, so both steps train the same weights. With
``--use-optimizer`` (fastlm's ``--optimizer adamw``) the example calls ``optimizer.step()`` instead of its loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.cells.triton import choose_interpreter
from fastlm.errors import FastlmError
from fastlm.model import RNNLM, detach_state
from fastlm.step.base import StepBase
from fastlm.step.optimizer import OptimizerSpec
from fastlm.timing import BACKWARD, CLIP, EMBEDDING_GRAD, FORWARD, LOSS, OPTIMIZER, PhaseTimer, phase


class ExampleStep(StepBase):
    def __init__(self, model: RNNLM, clip: float, lr: float, precision: str = "fp32",
                 optimizer: OptimizerSpec = OptimizerSpec()):
        if model.rnn.backend != "cudnn" or model.adaptive:
            raise FastlmError("the example's step runs torch.nn's recurrent layers and the full softmax: "
                              "it needs --backend cudnn and --decoder full")
        if precision not in ("fp32", "tf32"):
            raise FastlmError("the example's step runs in fp32 (TF32 allowed): it needs --precision fp32 or tf32")
        super().__init__(model, clip, lr, precision, optimizer)
        self.total_loss = 0.0  # what the example prints at its log interval

    def __call__(self, inputs, targets, state, timer: PhaseTimer):
        model = self.model
        model.zero_grad()
        with timer.phase(FORWARD):
            hidden, state = model(inputs, detach_state(state))
            logits = model.decode(hidden)
            with phase(LOSS):
                loss = F.nll_loss(F.log_softmax(logits, dim=1), targets)
        with timer.phase(BACKWARD):
            loss.backward()
            timer.split_rest(EMBEDDING_GRAD)
        with timer.phase(CLIP):
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        with timer.phase(OPTIMIZER):
            if self.plain_sgd:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-self.lr)
            else:
                self.optimizer.step()
        self.total_loss += loss.item()
        return loss.detach(), state


class CompiledBf16ExampleStep(ExampleStep):
    """The example's step as a user would speed it up with two lines of their own: its forward and loss under
    ``torch.autocast(bfloat16)`` and ``torch.compile`` (Inductor); backward, clipping, the update and the
    per-step ``.item()`` as the example does. A baseline for `fastlm bench` (backend ``compile-bf16``), not a
    training step fastlm offers: autocast runs the recurrence in bf16, which changes the model
    (fastlm.precision). The compiled function is the example's own module code (embedding, dropout, the
    torch.nn recurrent layers, dropout, Linear, log_softmax, nll_loss), not fastlm's RNNLM forward, whose
    profiler hooks would break Dynamo's graph."""

    def __init__(self, model: RNNLM, clip: float, lr: float):
        super().__init__(model, clip, lr, precision="fp32")
        self.precision = "compile-bf16"
        self.device_type = next(model.parameters()).device.type
        choose_interpreter()  # torch.compile imports triton, fixing how the triton backend's kernels can run
        self.forward_loss = torch.compile(self._forward_loss)

    def _forward_loss(self, inputs, state, targets):
        m = self.model
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            output, state = m.rnn(m.drop(m.encoder(inputs)), state)
            logits = m.decoder(m.drop(output)).view(-1, m.ntoken)
            loss = F.nll_loss(F.log_softmax(logits, dim=1), targets)
        return loss, state

    def __call__(self, inputs, targets, state, timer: PhaseTimer):
        model = self.model
        model.zero_grad()
        with timer.phase(FORWARD):
            loss, state = self.forward_loss(inputs, detach_state(state), targets)
        # What autocast made of it: the recurrence's dtype is its state's; Linear always runs in bf16.
        h = state[0] if isinstance(state, tuple) else state
        model.ran_in.update(embedding="float32", recurrence=str(h.dtype).removeprefix("torch."), decoder="bfloat16")
        with timer.phase(BACKWARD):
            loss.backward()
        with timer.phase(CLIP):
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        with timer.phase(OPTIMIZER):
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-self.lr)
        self.total_loss += loss.item()
        return loss.detach(), state
