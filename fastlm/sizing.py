"""Refuse a model that cannot fit in memory before allocating it, with a message instead of an allocator crash."""

from __future__ import annotations

import os

import torch

from fastlm.cells.math import GATES
from fastlm.config import ModelConfig
from fastlm.errors import FastlmError

# Weights, gradients, the snapshot of the last good state and the best model loaded for the final test each
# hold one copy of the parameters.
COPIES_WHILE_TRAINING = 4


def parameter_count(config: ModelConfig, vocab_size: int) -> int:
    gates = GATES[config.cell] * config.nhid
    recurrent = sum(gates * ((config.emsize if layer == 0 else config.nhid) + config.nhid + 2)
                    for layer in range(config.nlayers))
    decoder = 0 if config.tied else vocab_size * config.nhid
    return vocab_size * config.emsize + recurrent + decoder + vocab_size


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


def check_model_fits(config: ModelConfig, vocab_size: int, device: torch.device) -> None:
    needed = COPIES_WHILE_TRAINING * 4 * parameter_count(config, vocab_size)
    free = available_bytes(device)
    if needed > free:
        raise FastlmError(f"a {config.nlayers}x{config.nhid} {config.cell} with emsize {config.emsize} and "
                          f"{vocab_size:,} words needs about {needed / 2**30:.1f} GiB to train but {device} has "
                          f"{free / 2**30:.1f} GiB available; use smaller --emsize, --nhid or --nlayers")
