"""The one place a checkpoint is checked before anything is built from it (`fastlm train --resume`, `fastlm
generate`, and any later reader such as an export): ``open_checkpoint(path, device)``.

A checkpoint is a file the user hands over, so nothing in it is trusted until checked, in this order, each
refusal one line naming the file:

1. it is a fastlm checkpoint loadable with ``weights_only=True`` (fastlm.train.checkpoint.load_checkpoint);
2. its configuration is a valid RunConfig (a string, a negative size, an unknown cell or a NaN lr is refused);
3. the memory its model would need (the closed-form parameter count, no model built) fits ``device``: a file
   that claims 10^9 layers is refused at once instead of allocating for minutes;
4. its vocabulary is a list of distinct words whose SHA-256 is the digest it carries;
5. its weights are the ones the configuration describes (names and shapes, worked out without building the
   model; the layer count first, so a claim of many layers costs nothing) and all finite.

``check_matches(checked, config)`` then compares it with a run folder's own configuration (a last.pt from
another model is refused), and ``build_model`` builds the model and loads the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastlm.cells.math import CELL_MATH
from fastlm.config import RunConfig
from fastlm.errors import FastlmError, short
from fastlm.train.checkpoint import load_checkpoint

FLOAT_BYTES = 4


@dataclass
class CheckedCheckpoint:
    path: Path
    payload: dict
    config: RunConfig  # the checkpoint's own, validated
    vocab: list  # of str, in id order


def open_checkpoint(path, device: Optional[torch.device] = None, copies: int = 2,
                    mmap: bool = False) -> CheckedCheckpoint:
    """Loads and checks the checkpoint at ``path`` (steps 1-5 above); ``device`` and ``copies``: the memory check
    (how many copies of the weights the caller will hold on ``device``; None skips it)."""
    return check_payload(load_checkpoint(path, mmap=mmap), path, device, copies)


def check_payload(payload: dict, path, device: Optional[torch.device] = None, copies: int = 2) -> CheckedCheckpoint:
    path = Path(path)
    config = checkpoint_config(payload, path)
    vocab = _vocabulary(payload, path)
    if device is not None:
        check_memory(config, len(vocab), device, copies, path)
    _weights(payload, config, len(vocab), path)
    return CheckedCheckpoint(path, payload, config, vocab)


def checkpoint_config(payload: dict, path) -> RunConfig:
    values = payload.get("config")
    if not isinstance(values, dict):
        raise FastlmError(f"checkpoint {path} holds no configuration (found {type(values).__name__}); it was not "
                          f"written by fastlm train")
    try:
        config = RunConfig.from_dict(values, origin=f"checkpoint {path}")  # its refusals name the file
        try:
            return config.validate()
        except FastlmError as error:
            raise FastlmError(f"checkpoint {path} has an invalid configuration: {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise FastlmError(f"checkpoint {path} has an invalid configuration ({type(error).__name__}: "
                          f"{short(error, 160)})") from None


def parameter_count(config: RunConfig, vocab_size: int) -> int:
    from fastlm.train.sizing import parameter_count as count

    return count(config.model, vocab_size)


def check_memory(config: RunConfig, vocab_size: int, device: torch.device, copies: int, path) -> None:
    """Refuses a model whose weights (``copies`` of them) would not fit the memory ``device`` has free."""
    from fastlm.train.sizing import available_bytes

    needed = copies * FLOAT_BYTES * parameter_count(config, vocab_size)
    free = available_bytes(device)
    if needed > free:
        m = config.model
        raise FastlmError(f"checkpoint {path} describes a {m.nlayers}x{m.nhid} {m.cell} with emsize {m.emsize} and "
                          f"{vocab_size:,} words, which needs about {needed / 2**30:,.1f} GiB but {device} has "
                          f"{free / 2**30:,.1f} GiB available")


def _vocabulary(payload: dict, path) -> list:
    from fastlm.data.corpus import Vocabulary

    vocab = payload.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(isinstance(word, str) for word in vocab):
        raise FastlmError(f"checkpoint {path} has no vocabulary of words (a non-empty list of strings); it was not "
                          f"written by fastlm train")
    try:
        digest = Vocabulary(vocab).digest()
    except ValueError:
        raise FastlmError(f"checkpoint {path} has a vocabulary that holds a word twice; it is damaged") from None
    if payload.get("vocab_digest") != digest:
        raise FastlmError(f"checkpoint {path} has a vocabulary whose digest ({digest[:12]}) is not the one it carries "
                          f"({str(payload.get('vocab_digest'))[:12]}): the file was altered or damaged")
    return vocab


def expected_shapes(config: RunConfig, vocab_size: int) -> dict:
    """{name: shape} of the model's state_dict, worked out without building it (every backend keeps torch.nn's
    names, fastlm.cells.base)."""
    m = config.model
    gates = CELL_MATH[m.cell].gates * m.nhid
    shapes = {"encoder.weight": (vocab_size, m.emsize)}
    for layer in range(m.nlayers):
        shapes[f"rnn.weight_ih_l{layer}"] = (gates, m.emsize if layer == 0 else m.nhid)
        shapes[f"rnn.weight_hh_l{layer}"] = (gates, m.nhid)
        shapes[f"rnn.bias_ih_l{layer}"] = (gates,)
        shapes[f"rnn.bias_hh_l{layer}"] = (gates,)
    if m.decoder == "adaptive":
        from fastlm.model.adaptive import AdaptiveDecoder

        with torch.device("meta"):  # shapes only: no memory
            decoder = AdaptiveDecoder(m.nhid, vocab_size, m.cutoffs)
        shapes.update({f"decoder.{name}": tuple(t.shape) for name, t in decoder.state_dict().items()})
    else:
        shapes.update({"decoder.weight": (vocab_size, m.nhid), "decoder.bias": (vocab_size,)})
    return shapes


def _weights(payload: dict, config: RunConfig, vocab_size: int, path) -> None:
    weights = payload.get("model")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise FastlmError(f"checkpoint {path} holds no model weights (a dict of tensors); it was not written by "
                          f"fastlm train")
    m = config.model
    layers = sum(1 for name in weights if isinstance(name, str) and name.startswith("rnn.weight_hh_l"))
    if layers != m.nlayers:  # before listing what nlayers implies: a claim of 10^9 layers costs nothing
        raise FastlmError(f"checkpoint {path} describes {m.nlayers} recurrent layer(s) but holds the weights of "
                          f"{layers}; it was altered or damaged")
    expected = expected_shapes(config, vocab_size)
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has extra {_names(unexpected)}"]
                                                                    if unexpected else [])
        raise FastlmError(f"checkpoint {path} does not hold the weights of the {m.cell} it describes: it "
                          f"{' and '.join(parts)}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise FastlmError(f"checkpoint {path} does not hold the weights of the model it describes: {name} is "
                              f"{list(weights[name].shape)} in the file, {list(shape)} for a {m.nlayers}x{m.nhid} "
                              f"{m.cell} with emsize {m.emsize} and {vocab_size:,} words")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            raise FastlmError(f"checkpoint {path} holds non-finite weights (NaN or infinity, in {name}): a model "
                              f"cannot be used from it")


def check_matches(checked: CheckedCheckpoint, config: RunConfig, what: str, may_differ=frozenset()) -> None:
    """Refuses ``checked`` when its configuration differs from ``config`` (``what``'s, e.g. a run folder's
    config.json) in a setting outside ``may_differ`` ({(section, field)}), naming the first three."""
    ours, theirs = checked.config.to_dict(), config.to_dict()
    different = [f"{section}.{name} {theirs[section][name]!r} there, {value!r} in the checkpoint"
                 for section, values in ours.items() for name, value in values.items()
                 if (section, name) not in may_differ and theirs[section].get(name) != value]
    if different:
        raise FastlmError(f"checkpoint {checked.path} does not match {what} ({'; '.join(different[:3])}): it comes "
                          f"from another run; put back that run's own checkpoint, or start a new run")


def build_model(checked: CheckedCheckpoint, device: torch.device, backend: Optional[str] = None):
    """The model the checkpoint describes, with its weights, on ``device`` (``backend``: another backend's
    kernels for the same weights)."""
    from fastlm.model import RNNLM

    config = checked.config
    if backend is not None:
        config.model.backend = backend
    model = RNNLM(len(checked.vocab), config.model)
    try:
        model.load_state_dict(checked.payload["model"])
    except (RuntimeError, TypeError, ValueError) as error:  # checked above: only a backend's own quirk gets here
        raise FastlmError(f"checkpoint {checked.path} does not fit the model it describes "
                          f"({short(error, 160)})") from None
    return model.to(device)


def _names(names: list) -> str:
    shown = ", ".join(map(str, names[:3]))
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_resumable(checked: CheckedCheckpoint) -> None:
    """Refuses a checkpoint whose training state (position, lr, best loss, optimizer, RNG and hidden states)
    could not be continued: every field a resume reads has the type and range it was written with."""
    payload, path = checked.payload, checked.path

    def refuse(what: str):
        raise FastlmError(f"checkpoint {path} cannot be resumed: {what}; it was altered or damaged")

    for name, minimum in (("epoch", 1), ("batches_done", 0), ("step", 0)):
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            refuse(f"its {name} is {value!r}, not an integer of at least {minimum}")
    if not finite_number(payload.get("lr")) or not payload["lr"] > 0:
        refuse(f"its lr is {payload.get('lr')!r}")
    best = payload.get("best_val_loss")
    if best is not None and not finite_number(best):
        refuse(f"its best validation loss is {best!r}")
    for name in ("skipped_batches", "epoch_train_seconds"):
        value = payload.get(name, 0)
        if not finite_number(value) or value < 0:
            refuse(f"its {name} is {value!r}")
    if not isinstance(payload.get("optimizer"), dict):
        refuse("it holds no optimizer state")
    ranks = payload.get("rng_ranks") or [payload.get("rng")]
    if not isinstance(ranks, list) or not all(isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor)
                                              and isinstance(r.get("python"), (list, tuple)) for r in ranks):
        refuse("it holds no random-number states")
    m, d = checked.config.model, checked.config.data
    hidden = payload.get("hidden")
    if hidden is not None:
        parts = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden]
        shape = (m.nlayers, d.batch_size, m.nhid)
        if not parts or len(parts) > 2 or not all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape
                                                  and t.is_floating_point() and bool(torch.isfinite(t).all())
                                                  for t in parts):
            refuse(f"its hidden state is not {len(parts) or 1} finite tensor(s) of shape {list(shape)}")
