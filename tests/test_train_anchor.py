"""The semantic anchor: fastlm's trainer computes the PyTorch word_language_model example's losses.

The eager loop below is written from DESIGN.md's semantics, independently of fastlm: torch.nn LSTM/GRU,
log_softmax + NLL, clip_grad_norm_, p -= lr * grad, hidden state detached per batch. Every faster
trainer must keep producing these per-step losses.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm import cells
from fastlm.runs import RunFolder
from fastlm.train import Trainer
from tests.helpers import quiet_display, small_config, toy_corpus

STEPS = 20


class ExampleModel(nn.Module):
    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x, hidden):
        output, hidden = self.rnn(self.encoder(x), hidden)
        return F.log_softmax(self.decoder(output).view(-1, self.decoder.out_features), dim=1), hidden


def example_losses(corpus, config, steps):
    d, t, m = config.data, config.train, config.model
    torch.manual_seed(t.seed)
    model = ExampleModel(m.cell.upper(), len(corpus.vocab), m.emsize, m.nhid, m.nlayers)
    n = corpus.train.numel() // d.batch_size
    data = corpus.train[: n * d.batch_size].view(d.batch_size, -1).t().contiguous()
    hidden = None
    losses = []
    for i in range(0, steps * d.bptt, d.bptt):
        seq_len = min(d.bptt, len(data) - 1 - i)
        x, y = data[i:i + seq_len], data[i + 1:i + 1 + seq_len].reshape(-1)
        model.zero_grad()
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
        output, hidden = model(x, hidden)
        loss = F.nll_loss(output, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-t.lr)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def trainer_losses(corpus, config, tmp_path):
    losses = []
    trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: losses.append(loss.item()))
    trainer.fit(RunFolder(tmp_path / "run"))
    return torch.tensor(losses, dtype=torch.float64)


# cudnn runs the very kernels of the eager loop: agreement to float noise. Other backends compute the same
# function with other summation orders; a 1-ulp-level difference (~1e-7 relative) in a step's gradient
# grows through 20 SGD steps at lr 20, so they get a bound 100x looser, still far below any semantic
# change (a wrong gate order, a missed detach or clip moves the losses by >1e-2 within a few steps).
TOLERANCE = {"cudnn": 1e-5}
OTHER_BACKENDS = 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", sorted({b for _, b in cells.available()}))
def test_trainer_matches_example_loop(cell, backend, tmp_path):
    if (cell, backend) not in cells.available():
        pytest.skip(f"{cell}/{backend} is not available here")
    corpus = toy_corpus()
    config = small_config(model={"cell": cell, "backend": backend}, train={"max_steps": STEPS})
    expected = example_losses(corpus, config, STEPS)
    got = trainer_losses(corpus, config, tmp_path)
    assert got.shape == expected.shape
    rel = ((got - expected).abs() / expected.abs()).max().item()
    assert rel <= TOLERANCE.get(backend, OTHER_BACKENDS), f"max relative loss difference {rel:.2e}"


def test_anchor_detects_a_semantic_change(tmp_path):
    """The comparison has teeth: a trainer that skips clipping no longer matches."""
    corpus = toy_corpus()
    config = small_config(train={"max_steps": STEPS})
    expected = example_losses(corpus, config, STEPS)
    config.train.clip = 1e9
    got = trainer_losses(corpus, config, tmp_path)
    assert ((got - expected).abs() / expected.abs()).max().item() > 1e-3
