"""RNNLM: embedding -> dropout -> recurrent stack (any backend) -> dropout -> linear decoder.

Module names (encoder, rnn, decoder) and initialisation match the PyTorch word_language_model example, so
under the same seed the same weights come out, and its state_dict keys are the example's.
The forward pass stops before the decoder: ``decode`` gives logits (for sampling) and ``loss`` the mean
cross-entropy through the fused, chunked decoder + loss of fastlm.model.fused_loss, which never builds the
[tokens x vocabulary] tensors and times its GEMMs as the ``decoder`` phase and its softmax as ``loss``.

``decoder="adaptive"`` (opt-in, a different model) replaces the full softmax with an adaptive softmax over
frequency-ranked words (fastlm.model.adaptive); the module is still named ``decoder``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlm import cells
from fastlm.cells.cudnn import runs_on_cudnn
from fastlm.config import ModelConfig
from fastlm.errors import FastlmError
from fastlm.model.adaptive import AdaptiveDecoder
from fastlm.model.fused_loss import linear_cross_entropy
from fastlm.model.loss_chunks import Chunking
from fastlm.timing import DECODER, DECODER_GRAD, EMBEDDING, RNN, RNN_GRAD, phase, split_when_gradient_reaches


class RNNLM(nn.Module):
    def __init__(self, ntoken: int, config: ModelConfig):
        super().__init__()
        if config.tied and config.emsize != config.nhid:
            raise FastlmError(f"--tied needs --emsize equal to --nhid, got emsize {config.emsize} "
                              f"and nhid {config.nhid}")
        self.config = config
        self.ntoken = ntoken
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.Embedding(ntoken, config.emsize)
        self.rnn = cells.build(cell=config.cell, backend=config.backend, input_size=config.emsize,
                               hidden_size=config.nhid, num_layers=config.nlayers, dropout=config.dropout,
                               variant=config.variant)
        self.loss_chunking: Chunking | None = None  # overrides the device's default chunking (benchmarks, tests)
        # The dtypes the last forward's recurrence and the last loss's decoder GEMMs really ran in, for reports
        # (what a precision setting asked for is not proof of what ran).
        self.ran_in: dict[str, str] = {}
        self.adaptive = config.decoder == "adaptive"
        if self.adaptive:
            if config.tied:
                raise FastlmError("--tied cannot be combined with --decoder adaptive; drop one of them")
            self.decoder = AdaptiveDecoder(config.nhid, ntoken, config.cutoffs)
        else:
            self.decoder = nn.Linear(config.nhid, ntoken)
            if config.tied:
                self.decoder.weight = self.encoder.weight
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if not self.adaptive:  # the adaptive softmax keeps torch.nn's initialisation
            nn.init.zeros_(self.decoder.bias)
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def parameter_counts(self) -> dict:
        """Parameters by part: embedding, recurrent, decoder (tied: only its bias, the weight being the
        embedding's), and total (each shared tensor once)."""
        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        total = count(self)
        embedding, recurrent = count(self.encoder), count(self.rnn)
        return {"embedding": embedding, "recurrent": recurrent, "decoder": total - embedding - recurrent,
                "total": total}

    def init_state(self, batch_size: int):
        return self.rnn.zero_state(batch_size, self.encoder.weight)

    def forward(self, tokens: torch.Tensor, state=None):
        """tokens [T, B] -> (decoder input [T, B, H] after dropout, new state)."""
        with phase(EMBEDDING):
            emb = self.drop(self.encoder(tokens))
        with phase(RNN):
            output, state = self.rnn(emb, state)
        self.ran_in["embedding"] = dtype_name(emb.dtype)
        self.ran_in["recurrence"] = dtype_name(output.dtype)
        if self.rnn.backend == "cudnn":
            self.ran_in["recurrence_on_cudnn"] = runs_on_cudnn(output)
        # Backward's parts: the gradient reaching the stack's output ends the decoder's and loss's part; reaching
        # its input ends back-propagation through time (what is left is the embedding's).
        split_when_gradient_reaches(output, DECODER_GRAD)
        split_when_gradient_reaches(emb, RNN_GRAD)
        return self.drop(output), state

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, B, H] -> logits [T * B, V] (log-probabilities for the adaptive decoder: as good for sampling)."""
        self.ran_in["decoder"] = dtype_name(hidden.dtype)
        with phase(DECODER):
            if self.adaptive:
                return self.decoder.log_probs(hidden.reshape(-1, hidden.shape[-1]))
            return self.decoder(hidden).view(-1, self.ntoken)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor,
             compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` [T * B]: log_softmax + NLL as the example, fused.

        ``compute_dtype`` is what the decoder's GEMMs run in (bf16: fastlm.precision); the softmax and the
        loss stay fp32 and the weights' gradients come back in fp32 either way.
        """
        flat = hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled():  # a training step's (evaluation, under no_grad, is always fp32)
            self.ran_in["decoder"] = dtype_name(compute_dtype)
        if self.adaptive:
            with phase(DECODER):  # the adaptive softmax's clusters and its loss are one module
                if compute_dtype == torch.float32:
                    return self.decoder.loss(flat, targets)
                # Linear layers and log-softmax only: autocast runs the GEMMs in bf16, the softmax in fp32.
                with torch.autocast(flat.device.type, dtype=compute_dtype):
                    return self.decoder.loss(flat, targets)
        return linear_cross_entropy(flat, self.decoder.weight, self.decoder.bias, targets, self.loss_chunking,
                                    compute_dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def map_state(fn, *states):
    """``fn`` applied part by part to recurrent states: a tensor (GRU, RNN) or a tuple (LSTM's h and c)."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states, strict=True))
    return fn(*states)


def detach_state(state):
    """Cuts the graph between batches (truncated BPTT); the values carry over."""
    return map_state(torch.Tensor.detach, state)
