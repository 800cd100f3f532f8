"""Batches for truncated backpropagation through time, as the PyTorch word_language_model example makes them.

``batchify`` trims a 1-D token stream to a multiple of the batch size and lays it out as [n, B], each
column a contiguous slice of the corpus. ``batch_starts`` are the rows where bptt-long chunks begin; the
last chunk is shorter (``n - 1 - i`` rows) because every input row needs the next row as its target.
"""

from __future__ import annotations

import torch

from fastlm.errors import FastlmError


def batchify(ids: torch.Tensor, batch_size: int, split: str = "train") -> torch.Tensor:
    """[N] token ids -> [N // B, B]; column b holds tokens b*(N//B) ... (b+1)*(N//B) - 1."""
    rows = ids.numel() // batch_size
    if rows < 2:
        raise FastlmError(f"batch size {batch_size} is too large for the {split} split ({ids.numel()} tokens): "
                          f"each of the batch's columns needs at least 2 tokens; use a batch size of at most "
                          f"{max(ids.numel() // 2, 1)}")
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()


def check_bptt(source: torch.Tensor, bptt: int, split: str = "train") -> None:
    if bptt > source.shape[0] - 1:
        raise FastlmError(f"--bptt {bptt} is larger than the {split} split allows at this batch size "
                          f"({source.shape[0] - 1} steps per column); use a smaller --bptt or --batch-size")


def batch_starts(source: torch.Tensor, bptt: int) -> range:
    return range(0, source.shape[0] - 1, bptt)


def get_batch(source: torch.Tensor, start: int, bptt: int):
    """(inputs [t, B], targets [t * B]) for the chunk starting at row ``start``; t = bptt except at the end."""
    length = min(bptt, source.shape[0] - 1 - start)
    return source[start:start + length], source[start + 1:start + 1 + length].reshape(-1)


class BatchStreamer:
    """Feeds (inputs, targets) chunks of a batchified split to the training device.

    On CUDA the split lives in pinned host memory and each chunk is copied with ``non_blocking=True``, so
    the copy is queued on the stream instead of stalling the host. On CPU the chunks are views, no copy.
    Iteration can start at any chunk index (``start_batch``), which is what resuming a run needs.
    """

    def __init__(self, source: torch.Tensor, bptt: int, device: torch.device):
        self.bptt = bptt
        self.device = torch.device(device)
        self.starts = batch_starts(source, bptt)
        on_cuda = self.device.type == "cuda"
        self.source = source.pin_memory() if on_cuda else source.to(self.device)
        self.non_blocking = on_cuda

    def __len__(self) -> int:
        return len(self.starts)

    def iterate(self, start_batch: int = 0):
        """Yields (batch_index, inputs, targets) from chunk ``start_batch`` to the end of the split."""
        for index in range(start_batch, len(self.starts)):
            inputs, targets = get_batch(self.source, self.starts[index], self.bptt)
            yield (index,
                   inputs.to(self.device, non_blocking=self.non_blocking),
                   targets.to(self.device, non_blocking=self.non_blocking))
