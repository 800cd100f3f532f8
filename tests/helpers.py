"""Small builders and settings shared by the tests: a test file imports them from here (or from another support
module: tolerances.py, example_corpus.py, ...), never from another test file."""

import contextlib
import io
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fastlm import cells
from fastlm.cli import main
from fastlm.config import RunConfig
from fastlm.data.corpus import corpus_from_texts
from fastlm.train.progress import TrainDisplay

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--emsize", 16, "--nhid", 16, "--batch-size", 4, "--bptt", 8, "--device", "cpu")  # train flags: a quick run


def toy_corpus(seed: int = 0, words: int = 120, lines=(600, 60, 60)):
    """A seeded random corpus: fast to train on, large enough for a few dozen batches."""
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(words)]

    def text(n_lines):
        return "".join(" ".join(rng.choices(lexicon, k=rng.randint(3, 14))) + "\n" for _ in range(n_lines))

    return corpus_from_texts({"train": text(lines[0]), "valid": text(lines[1]), "test": text(lines[2])},
                             source="toy corpus")


def write_corpus_folder(corpus, folder: Path) -> Path:
    """``corpus`` written back as train.txt, valid.txt and test.txt (a line per <eos>): a --data folder."""
    for split in ("train", "valid", "test"):
        words = [corpus.vocab.idx2word[i] for i in getattr(corpus, split).tolist()]
        text = " ".join(words).replace(" <eos> ", "\n").replace(" <eos>", "\n")
        (folder / f"{split}.txt").write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return folder


def quiet_display() -> TrainDisplay:
    return TrainDisplay(Console(file=io.StringIO(), force_terminal=False))


def small_config(**overrides) -> RunConfig:
    config = RunConfig()
    config.update({"model": {"emsize": 32, "nhid": 32, "dropout": 0.0},
                   "data": {"batch_size": 8, "bptt": 12, "eval_batch_size": 4},
                   "train": {"log_interval": 5, "epochs": 1, "device": "cpu"}}, origin="test")
    for section, values in overrides.items():
        config.update({section: values}, origin="test")
    return config.validate()


def backend_param(cell: str, backend: str, *values, marks=(), id=None):
    """A pytest param for a registered (cell, backend) pair, skipped with the registry's reason when the
    pair cannot run here: a backend that breaks shows up as SKIPPED, never as tests that quietly vanish."""
    reason = cells.unavailable_reason(cell, backend)
    marks = list(marks) + ([pytest.mark.skip(reason=f"{cell}/{backend}: {reason}")] if reason else [])
    return pytest.param(cell, backend, *values, marks=marks, id=id or f"{cell}-{backend}")


def run_cli(*args):
    """`fastlm ARGS` in this process: (exit status, stdout, stderr). Much faster than a subprocess (no fresh
    interpreter and torch import), for tests of what the command says; the subprocess tests cover the rest."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse exits on bad flag syntax
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def one_line_error(status, stderr: str) -> str:
    """The single line of a refusal (exit status 2, no traceback)."""
    assert status == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastlm"), stderr
    return lines[0]


# --- the recurrent stacks parity tests compare (their bound: tests/tolerances.py) ---------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_pair(cell, backend, shape, layers, dropout=0.0, seed=0, variant=None):
    """(reference, backend) stacks with identical weights, on DEVICE; ``variant`` None: the backend's default."""
    _, _, E, H = shape
    torch.manual_seed(seed)
    ref = cells.build(cell=cell, backend="reference", input_size=E, hidden_size=H, num_layers=layers, dropout=dropout)
    other = cells.build(cell=cell, backend=backend, input_size=E, hidden_size=H, num_layers=layers, dropout=dropout,
                        variant=variant)
    other.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), other.to(DEVICE)


def make_inputs(cell, shape, layers, dtype=torch.float32, seed=1):
    """x [T, B, E], an initial state, and cotangents for y and the final state, all random."""
    T, B, E, H = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(DEVICE, dtype)

    state = (rand(layers, B, H), rand(layers, B, H)) if cell == "lstm" else rand(layers, B, H)
    cotangents = [rand(T, B, H)] + [rand(layers, B, H) for _ in range(2 if cell == "lstm" else 1)]
    return rand(T, B, E), state, cotangents


def as_list(state):
    return list(state) if isinstance(state, (tuple, list)) else [state]


def run(layer, cell, x, state, cotangents):
    """Forward + backward; returns {name: tensor} of outputs and gradients, all detached, fp32."""
    x = x.clone().requires_grad_(True)
    state = [s.clone().requires_grad_(True) for s in as_list(state)]
    layer.zero_grad(set_to_none=True)
    y, final = layer(x, tuple(state) if cell == "lstm" else state[0])
    outputs = [y] + as_list(final)
    sum((out.float() * cot.float()).sum() for out, cot in zip(outputs, cotangents, strict=True)).backward()
    result = {"y": y, "h_n": outputs[1], "dx": x.grad, "dh0": state[0].grad}
    if cell == "lstm":
        result.update(c_n=outputs[2], dc0=state[1].grad)
    result.update({f"d{name}": p.grad for name, p in layer.named_parameters()})
    return {name: t.detach().float() for name, t in result.items()}
