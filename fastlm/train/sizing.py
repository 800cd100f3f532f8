"""Refuse a run that cannot fit in memory before allocating it, with a message instead of an allocator crash.

Two parts count: copies of the parameters, and one step's activations, which grow with the batch
(bptt x batch size tokens) and can dwarf the parameters (emsize 10^7 on a 5-word corpus: 200 MB of weights,
28 GB of embedding output). The activation figure is a rough upper bound of what autograd keeps; it only
has to catch runs that are off by orders of magnitude, not tell 10% apart.
"""

from __future__ import annotations

import os

import torch

from fastlm.cells.math import CELL_MATH
from fastlm.config import ModelConfig, RunConfig
from fastlm.errors import FastlmError
from fastlm.model.loss_chunks import default_chunking

# Weights, gradients, the snapshot of the last good state and the best model loaded for the final test each
# hold one copy of the parameters.
COPIES_WHILE_TRAINING = 4
# AdamW's two moments per parameter, and their copies in that snapshot (SGD keeps no per-parameter state).
OPTIMIZER_COPIES = {"sgd": 0, "adamw": 4}
FLOAT_BYTES = 4


def parameter_count(config: ModelConfig, vocab_size: int) -> int:
    gates = CELL_MATH[config.cell].gates * config.nhid
    # Closed form, not a loop over layers: --nlayers 10^12 must be refused at once.
    recurrent = gates * (config.emsize + config.nhid + 2) + (config.nlayers - 1) * gates * (2 * config.nhid + 2)
    decoder = 0 if config.tied else vocab_size * config.nhid
    return vocab_size * config.emsize + recurrent + decoder + vocab_size


def activation_count(config: RunConfig, vocab_size: int, device: torch.device) -> int:
    """Floats a training step (saved tensors and their gradients) or an evaluation step holds at its peak."""
    m, d = config.model, config.data
    # Embedding output, its dropout mask and result; per layer the gates, states and outputs; the last
    # layer's dropout.
    per_token = 3 * m.emsize + m.nlayers * (CELL_MATH[m.cell].gates + 4) * m.nhid + 2 * m.nhid
    tokens = d.bptt * d.batch_size
    # The example's step holds four [tokens x vocabulary] tensors; the fused loss three of a chunk's rows.
    if config.train.step == "example":
        decoder = 4 * tokens * vocab_size
    else:
        decoder = 3 * default_chunking(device, tokens, vocab_size).tokens * vocab_size
    training = 2 * tokens * per_token + decoder  # backward holds gradients of about the saved tensors' size
    # Evaluation (either step) runs under no_grad through the fused loss: nothing saved, one chunk's logits.
    eval_tokens = d.bptt * d.eval_batch_size
    evaluation = eval_tokens * per_token + 2 * default_chunking(device, eval_tokens, vocab_size).tokens * vocab_size
    return max(training, evaluation)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_run_fits(config: RunConfig, vocab_size: int, device: torch.device) -> None:
    m, d = config.model, config.data
    copies = COPIES_WHILE_TRAINING + OPTIMIZER_COPIES[config.train.optimizer]
    weights = copies * FLOAT_BYTES * parameter_count(m, vocab_size)
    activations = FLOAT_BYTES * activation_count(config, vocab_size, device)
    free = available_bytes(device)
    if weights + activations > free:
        raise FastlmError(f"a {m.nlayers}x{m.nhid} {m.cell} with emsize {m.emsize} and {vocab_size:,} words "
                          f"at batch size {d.batch_size}, bptt {d.bptt} needs about "
                          f"{(weights + activations) / 2**30:.1f} GiB to train ({weights / 2**30:.1f} GiB of "
                          f"weights) but {device} has {free / 2**30:.1f} GiB available; use smaller --emsize, "
                          f"--nhid, --nlayers, --batch-size, --eval-batch-size or --bptt")
