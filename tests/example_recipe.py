"""The PyTorch word_language_model recipe, written again from docs/semantics.md without fastlm's code.

It is the oracle of the semantic anchor (test_train_anchor.py): the whole recipe, not one step. Model:
Embedding -> dropout -> torch.nn LSTM/GRU (dropout between layers) -> dropout -> Linear, initialised as the
example does; data batchified into [rows, batch] columns and cut into bptt-long chunks, the last one
shorter; per batch: zero the gradients, detach the carried hidden state, log_softmax + NLL, backward,
clip_grad_norm_, p -= lr * grad. After each epoch: evaluation over the validation split at the eval batch
size, carrying the hidden state across its batches; the best model is kept, and lr /= 4 when validation did
not improve. At the end the best model's test loss. Dropout masks are drawn in the example's order from the
one global generator that the seed set: embedding output, then the recurrent stack, then its output.

``layerwise=True`` builds the recurrent stack from one-layer torch.nn modules with F.dropout between them.
On CPU that is torch.nn's multi-layer module draw for draw (the anchor checks it); on CUDA it is the
semantics the non-cuDNN backends implement, since cuDNN draws its inter-layer masks from a state of its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RecipeRun:
    step_losses: list = field(default_factory=list)  # training loss of every batch, in order
    val_losses: list = field(default_factory=list)  # per epoch
    improved: list = field(default_factory=list)  # per epoch: did validation beat the best so far
    lr_after_epoch: list = field(default_factory=list)  # the lr the next epoch trains with
    test_loss: float = float("nan")  # of the best model


class ExampleModel(nn.Module):
    def __init__(self, cell: str, ntoken: int, emsize: int, nhid: int, nlayers: int, dropout: float, tied: bool,
                 layerwise: bool):
        super().__init__()
        rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.cell, self.nlayers, self.nhid, self.dropout = cell, nlayers, nhid, dropout
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, emsize)
        if layerwise:
            self.rnn = nn.ModuleList(rnn_class(emsize if k == 0 else nhid, nhid) for k in range(nlayers))
        else:
            self.rnn = rnn_class(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        if tied:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def recurrent(self, x, hidden):
        if not isinstance(self.rnn, nn.ModuleList):
            return self.rnn(x, hidden)
        finals = []
        for k, layer in enumerate(self.rnn):
            layer_state = tuple(s[k:k + 1] for s in hidden) if self.cell == "lstm" else hidden[k:k + 1]
            x, final = layer(x, layer_state)
            finals.append(final)
            if k < self.nlayers - 1:
                x = F.dropout(x, self.dropout, self.training)
        if self.cell == "lstm":
            return x, tuple(torch.cat(parts) for parts in zip(*finals, strict=True))
        return x, torch.cat(finals)

    def forward(self, tokens, hidden):
        output, hidden = self.recurrent(self.drop(self.encoder(tokens)), hidden)
        logits = self.decoder(self.drop(output))
        return F.log_softmax(logits.view(-1, logits.shape[-1]), dim=1), hidden

    def init_hidden(self, batch_size: int):
        weight = self.encoder.weight
        h = weight.new_zeros(self.nlayers, batch_size, self.nhid)
        return (h, h.clone()) if self.cell == "lstm" else h


def batchify(ids: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    rows = ids.numel() // batch_size
    return ids[: rows * batch_size].view(batch_size, -1).t().contiguous().to(device)


def get_batch(source: torch.Tensor, i: int, bptt: int):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def repackage_hidden(hidden):
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


def evaluate(model: ExampleModel, source: torch.Tensor, bptt: int, batch_size: int, reset_state: bool = False) -> float:
    model.eval()
    total = 0.0
    hidden = model.init_hidden(batch_size)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            data, targets = get_batch(source, i, bptt)
            if reset_state:
                hidden = model.init_hidden(batch_size)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total += len(data) * F.nll_loss(output, targets).item()
    return total / (len(source) - 1)


def run_recipe(corpus, config, device="cpu", layerwise: bool = False, reset_state: bool = False) -> RecipeRun:
    """Trains ``config.train.epochs`` full epochs of the example on ``corpus``; returns what it measured.
    ``reset_state``: every chunk starts from a zero hidden state instead of the previous chunk's (an ablation,
    not the example)."""
    m, d, t = config.model, config.data, config.train
    torch.manual_seed(t.seed)
    model = ExampleModel(m.cell, len(corpus.vocab), m.emsize, m.nhid, m.nlayers, m.dropout, m.tied,
                         layerwise).to(device)
    train = batchify(corpus.train, d.batch_size, device)
    valid = batchify(corpus.valid, d.eval_batch_size, device)
    test = batchify(corpus.test, d.eval_batch_size, device)
    lr, best_val, best_state = t.lr, None, None
    run = RecipeRun()
    for _ in range(t.epochs):
        model.train()
        hidden = model.init_hidden(d.batch_size)
        for i in range(0, train.size(0) - 1, d.bptt):
            data, targets = get_batch(train, i, d.bptt)
            model.zero_grad()
            hidden = model.init_hidden(d.batch_size) if reset_state else repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = F.nll_loss(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            run.step_losses.append(loss.item())
        val_loss = evaluate(model, valid, d.bptt, d.eval_batch_size, reset_state)
        improved = best_val is None or val_loss < best_val
        if improved:
            best_val, best_state = val_loss, copy.deepcopy(model.state_dict())
        else:
            lr /= 4.0
        run.val_losses.append(val_loss)
        run.improved.append(improved)
        run.lr_after_epoch.append(lr)
    model.load_state_dict(best_state)
    run.test_loss = evaluate(model, test, d.bptt, d.eval_batch_size, reset_state)
    return run
