"""Small builders shared by the training tests."""

import io
import random

from rich.console import Console

from fastlm.config import RunConfig
from fastlm.data.corpus import corpus_from_texts
from fastlm.display import TrainDisplay


def toy_corpus(seed: int = 0, words: int = 120, lines=(600, 60, 60)):
    """A seeded random corpus: fast to train on, large enough for a few dozen batches."""
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(words)]

    def text(n_lines):
        return "".join(" ".join(rng.choices(lexicon, k=rng.randint(3, 14))) + "\n" for _ in range(n_lines))

    return corpus_from_texts({"train": text(lines[0]), "valid": text(lines[1]), "test": text(lines[2])},
                             source="toy corpus")


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
