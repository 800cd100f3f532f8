"""Text from a trained checkpoint, sampled word by word (`fastlm generate`)."""

from __future__ import annotations

import torch

from fastlm.config import RunConfig
from fastlm.errors import FastlmError, first_line
from fastlm.model import RNNLM
from fastlm.train.checkpoint import load_checkpoint


def model_from_checkpoint(payload: dict, path, backend: str | None = None) -> RNNLM:
    try:
        config = RunConfig.from_dict(payload["config"], origin=f"checkpoint {path}")
        vocab = payload["vocab"]
        state = payload["model"]
    except (KeyError, TypeError):
        raise FastlmError(f"checkpoint {path} lacks its config, vocabulary or model weights; "
                          f"it was not written by fastlm train") from None
    if backend is not None:
        config.model.backend = backend
    model = RNNLM(len(vocab), config.model)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise FastlmError(f"checkpoint {path} does not fit the model it describes: {first_line(e)}") from None
    return model


def generate(path, words: int, temperature: float, seed: int, device: torch.device) -> str:
    """Samples ``words`` words; a newline after every 20th, as the example does."""
    if words < 1:
        raise FastlmError(f"--words must be at least 1, got {words}")
    if not temperature > 0:
        raise FastlmError(f"--temperature must be positive, got {temperature}")
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, path).to(device).eval()
    vocab = payload["vocab"]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    token = torch.randint(len(vocab), (1, 1), generator=generator)
    state = model.init_state(1)
    pieces = []
    with torch.no_grad():
        for i in range(words):
            hidden, state = model(token.to(device), state)
            logits = model.decode(hidden).squeeze(0).float().cpu()
            probs = torch.softmax(logits / temperature, dim=-1)
            index = int(torch.multinomial(probs, 1, generator=generator))
            token.fill_(index)
            pieces.append(vocab[index] + ("\n" if i % 20 == 19 else " "))
    return "".join(pieces)
