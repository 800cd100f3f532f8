"""What a checkpoint holds, and putting it back: everything needed to continue a run exactly.

Beyond the weights: the optimizer state and learning rate, the position in the data (epoch, batches done),
the hidden state carried between batches, the best validation loss, the RNG states (so dropout masks repeat),
the configuration and the vocabulary (with its digest, to refuse a checkpoint trained on other data).
"""

from __future__ import annotations

import random

import torch

from fastlm.errors import FastlmError


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
    if state is None:
        return None
    return [s.detach().cpu() for s in state] if isinstance(state, tuple) else [state.detach().cpu()]


def hidden_from_saved(saved, device):
    if saved is None:
        return None
    tensors = [t.to(device) for t in saved]
    return tuple(tensors) if len(tensors) == 2 else tensors[0]


def check_vocabulary(payload: dict, corpus, path) -> None:
    if payload.get("vocab_digest") != corpus.vocab.digest():
        raise FastlmError(f"checkpoint {path} was trained on another vocabulary ({len(payload.get('vocab', []))} "
                          f"words, digest {str(payload.get('vocab_digest'))[:12]}) than the data given now "
                          f"({corpus.source}: {len(corpus.vocab)} words, digest {corpus.vocab.digest()[:12]}); "
                          f"pass the same --data as the run used")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how large one checkpoint of this model is (weights; SGD keeps no per-parameter state)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
