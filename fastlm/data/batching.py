"""Batches for truncated backpropagation through time, as the PyTorch word_language_model example makes them.

``batchify`` trims a 1-D token stream to a multiple of the batch size and lays it out as [n, B], each
column a contiguous slice of the corpus. ``batch_starts`` are the rows where bptt-long chunks begin; the
last chunk is shorter (``n - 1 - i`` rows) because every input row needs the next row as its target.
``BatchStreamer`` hands a batchified split's chunks to the device as (index, inputs [t, B], targets [t * B]),
int64; ``to_device``, which it shares with fastlm.data.stream, overlaps each chunk's copy to a CUDA device
with the step before it.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastlm.errors import FastlmError


def batchify(ids: torch.Tensor, batch_size: int, split: str = "train") -> torch.Tensor:
    """[N] token ids -> [N // B, B]; column b holds tokens b*(N//B) ... (b+1)*(N//B) - 1."""
    rows = batch_rows(ids.numel(), batch_size, split)
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()


def batch_rows(tokens: int, batch_size: int, split: str = "train") -> int:
    """Rows of the batchified split (tokens per column), checked to give every column an input and a target."""
    rows = tokens // batch_size
    if rows < 2:
        flag = "--batch-size" if split == "train" else "--eval-batch-size"
        raise FastlmError(f"{flag} {batch_size} is too large for the {split} split ({tokens} tokens): each of "
                          f"the batch's columns needs at least 2 tokens; use {flag} {max(tokens // 2, 1)} "
                          f"or less")
    return rows


def check_bptt(source: torch.Tensor, bptt: int, split: str = "train") -> None:
    check_bptt_rows(source.shape[0], bptt, split)


def check_bptt_rows(rows: int, bptt: int, split: str = "train") -> None:
    """A split of ``rows`` rows must hold at least one bptt-long chunk (its inputs and their targets)."""
    if bptt > rows - 1:
        raise FastlmError(f"--bptt {bptt} is larger than the {split} split allows at this batch size "
                          f"({rows - 1} steps per column); use a smaller --bptt or --batch-size")


def batch_starts(source: torch.Tensor, bptt: int) -> range:
    return range(0, source.shape[0] - 1, bptt)


def get_batch(source: torch.Tensor, start: int, bptt: int):
    """(inputs [t, B], targets [t * B]) for the chunk starting at row ``start``; t = bptt except at the end."""
    length = min(bptt, source.shape[0] - 1 - start)
    return source[start:start + length], source[start + 1:start + 1 + length].reshape(-1)


class BatchStreamer:
    """Feeds (inputs, targets) chunks of a batchified split to the training device.

    On CUDA the split lives in pinned host memory and chunks reach the device through ``to_device``: each
    chunk's copy is issued on a side stream while the step before it computes. On CPU the chunks are
    views, no copy. Iteration can start at any chunk index (``start_batch``), which is what resuming needs.
    """

    def __init__(self, source: torch.Tensor, bptt: int, device: torch.device):
        self.bptt = bptt
        self.device = torch.device(device)
        self.starts = batch_starts(source, bptt)
        self.source = source.pin_memory() if self.device.type == "cuda" else source.to(self.device)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def rows(self) -> int:
        """Tokens per column of the batchified split (TokenFileStream has the same attribute)."""
        return self.source.shape[0]

    @property
    def column_count(self) -> int:
        """Columns of each batch (TokenFileStream has the same attribute)."""
        return self.source.shape[1]

    def iterate(self, start_batch: int = 0, count: Optional[int] = None):
        """Yields (batch_index, inputs, targets) from chunk ``start_batch`` to the end of the split, or, with
        ``count``, that many chunks, going round to the split's start after its last one."""
        indices = (range(start_batch, len(self.starts)) if count is None else
                   ((start_batch + j) % len(self.starts) for j in range(count)))
        host = ((index, *get_batch(self.source, self.starts[index], self.bptt)) for index in indices)
        return to_device(host, self.device)


def to_device(host_batches, device: torch.device, stage: bool = False):
    """(index, inputs, targets) on ``device`` for each host batch of ``host_batches``.

    On CUDA, batch i+1's copy is issued on a side stream before batch i is handed out, so it overlaps
    batch i's step and the consumer's data phase is only an event wait. The consumer's stream waits for
    each copy, and ``record_stream`` keeps the allocator from reusing a batch's memory before that stream
    is done with it. Host tensors must be pinned and stay unchanged while their copy may run, unless
    ``stage``: then each batch is first copied into one of two pinned buffers of this function's own,
    which is reused only once its previous copy has finished. Elsewhere batches pass through unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield from host_batches
        return
    copy_stream = torch.cuda.Stream(device)
    slots = [_PinnedSlot(), _PinnedSlot()]

    def start_copy(number, batch):
        index, inputs, targets = batch
        slot = slots[number % 2] if stage else None
        if slot is not None:
            inputs, targets = slot.fill(inputs, targets)
        with torch.cuda.stream(copy_stream):
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        if slot is not None:
            slot.copied = copied
        return index, inputs, targets, copied

    pending = None
    for number, batch in enumerate(host_batches):
        issued = start_copy(number, batch)
        if pending is not None:
            yield _hand_over(*pending)
        pending = issued
    if pending is not None:
        yield _hand_over(*pending)


class _PinnedSlot:
    """Pinned host buffers for one batch in flight; ``fill`` waits until their last copy is done."""

    def __init__(self):
        self.inputs = self.targets = self.copied = None

    def fill(self, inputs: torch.Tensor, targets: torch.Tensor):
        if self.copied is not None:
            self.copied.synchronize()
        if self.inputs is None or self.inputs.numel() < inputs.numel():
            self.inputs = torch.empty(inputs.numel(), dtype=inputs.dtype).pin_memory()
            self.targets = torch.empty(targets.numel(), dtype=targets.dtype).pin_memory()
        pinned_inputs = self.inputs[:inputs.numel()].view(inputs.shape).copy_(inputs)
        pinned_targets = self.targets[:targets.numel()].view(targets.shape).copy_(targets)
        return pinned_inputs, pinned_targets


def _hand_over(index, inputs, targets, copied):
    consumer = torch.cuda.current_stream(inputs.device)
    consumer.wait_event(copied)
    inputs.record_stream(consumer)
    targets.record_stream(consumer)
    return index, inputs, targets
