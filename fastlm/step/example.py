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
