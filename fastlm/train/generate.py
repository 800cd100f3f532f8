"""Text from a trained checkpoint, sampled word by word (`fastlm generate`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastlm.config import MAX_SEED
from fastlm.errors import FastlmError
from fastlm.train.verify import build_model, open_checkpoint


def _check_not_a_missing_best(path) -> None:
    """A run's best.pt is written when an epoch's validation ends; a run paused or stopped before its first one
    (a --max-steps or --max-minutes budget, a signal) has only its last.pt. Asked for such a best.pt, say that,
    rather than only that the file does not exist."""
    path = Path(path)
    last = path.with_name("last.pt")
    if path.name == "best.pt" and not path.exists() and last.is_file():
        raise FastlmError(f"{path} does not exist yet: best.pt is written when an epoch's validation ends, and this "
                          f"run stopped before its first one; its latest weights are in {last}: use --checkpoint "
                          f"{last}, or finish an epoch first with fastlm train --resume {path.parent}")


def check_options(words: int, temperature: float, seed: int) -> None:
    if words < 1:
        raise FastlmError(f"--words must be at least 1, got {words}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise FastlmError(f"--temperature must be a positive finite number, got {temperature}")
    if not 0 <= seed <= MAX_SEED:
        raise FastlmError(f"--seed must be an integer from 0 to 2^63-1, got {seed}")


def generate(path, words: int, temperature: float, seed: int, device: torch.device) -> str:
    """Samples ``words`` words; a newline after every 20th, as the example does."""
    check_options(words, temperature, seed)
    _check_not_a_missing_best(path)
    checked = open_checkpoint(path, device, copies=2)  # the file's tensors and the model's
    model = build_model(checked, device).eval()
    vocab = checked.vocab
    generator = torch.Generator(device="cpu").manual_seed(seed)
    token = torch.randint(len(vocab), (1, 1), generator=generator)
    state = model.init_state(1)
    pieces = []
    with torch.no_grad():
        for i in range(words):
            hidden, state = model(token.to(device), state)
            logits = model.decode(hidden).squeeze(0).double().cpu()
            # Shifted so that the largest logit is 0 before dividing: however small the temperature, the most
            # likely word keeps probability > 0 (no 0/0), and the sampling turns greedy in the limit.
            probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise FastlmError(f"checkpoint {path}: the model's outputs overflow (infinite logits), so no word can "
                                  f"be sampled from them")
            index = int(torch.multinomial(probs, 1, generator=generator))
            token.fill_(index)
            pieces.append(vocab[index] + ("\n" if i % 20 == 19 else " "))
    return "".join(pieces)
