"""What a checkpoint holds, and putting it back: everything needed to continue a run exactly.

Beyond the weights: the optimizer state and learning rate, the position in the data (epoch, batches done),
the hidden state carried between batches, the best validation loss, the RNG states (so dropout masks repeat),
the configuration and the vocabulary (with its digest, to refuse a checkpoint trained on other data).
"""

from __future__ import annotations

import random

import torch

from fastlm.cells.math import CELL_MATH
from fastlm.errors import FastlmError
from fastlm.model import map_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def hidden_to_save(state):
    """The carried hidden state on the CPU, in its own shape: a tensor, or LSTM's (h, c) tuple."""
    return None if state is None else map_state(lambda s: s.detach().cpu(), state)


def hidden_from_saved(saved, device, cell: str):
    """The saved hidden state on ``device``. Checkpoints written before the state was saved in its own shape
    hold a list ([h], or [h, c] for a cell with a cell state)."""
    if saved is None:
        return None
    if isinstance(saved, list):
        saved = tuple(saved) if CELL_MATH[cell].has_cell_state else saved[0]
    return map_state(lambda s: s.to(device), saved)


def check_vocabulary(payload: dict, corpus, path) -> None:
    if payload.get("vocab_digest") != corpus.vocab.digest():
        raise FastlmError(f"checkpoint {path} was trained on another vocabulary ({len(payload.get('vocab', []))} "
                          f"words, digest {str(payload.get('vocab_digest'))[:12]}) than the data given now "
                          f"({corpus.source}: {len(corpus.vocab)} words, digest {corpus.vocab.digest()[:12]}); "
                          f"pass the same --data as the run used")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how large one checkpoint of this model is (weights; SGD keeps no per-parameter state)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
