"""Batches streamed from a token-id file through a memory map: corpora bigger than memory.

``TokenFileStream`` gives the batches ``BatchStreamer`` gives for ``batchify(ids, B)`` (the example's
layout: column b is the b-th contiguous slice of the corpus, chunks of bptt rows, the last one shorter),
but reads each batch's t+1 rows of every column straight from a .npy file of token ids (the token cache's
``<split>.npy``, any integer dtype), so the split is never loaded as a whole.

Host memory stays flat however long the corpus is: the file is mapped read-only and, as the columns
advance, the pages already consumed are released from the mapping (``madvise(MADV_DONTNEED)``); they
stay in the kernel's page cache, which the kernel may drop at will, but no longer count in the process's
resident memory. On CUDA the batches go through fastlm.data.batching.to_device with pinned staging.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from fastlm.data.batching import to_device
from fastlm.errors import FastlmError

RELEASE_EVERY = 64  # batches between releases of consumed pages


class TokenFileStream:
    def __init__(self, path, batch_size: int, bptt: int, device: torch.device, vocab_size: int | None = None):
        self.path = Path(path)
        self.batch_size, self.bptt, self.device = batch_size, bptt, torch.device(device)
        self.vocab_size = vocab_size
        self._file = open(self.path, "rb")
        try:
            self._map, self.ids, self._data_offset = _map_npy(self._file, self.path)
        except Exception:
            self._file.close()
            raise
        self.rows = self.ids.size // batch_size
        if self.rows < 2:
            raise FastlmError(f"batch size {batch_size} is too large for {self.path} ({self.ids.size} tokens): "
                              f"each column needs at least 2 tokens")
        if bptt > self.rows - 1:
            raise FastlmError(f"--bptt {bptt} is larger than {self.path} allows at batch size {batch_size} "
                              f"({self.rows - 1} steps per column); use a smaller --bptt or --batch-size")
        self.starts = range(0, self.rows - 1, bptt)
        self._column_offsets = np.arange(batch_size, dtype=np.int64) * self.rows
        self._released = 0  # rows of every column whose pages were released

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [t, B], targets [t * B]) of chunk ``index`` as int64 CPU tensors."""
        start = self.starts[index]
        length = min(self.bptt, self.rows - 1 - start)
        positions = self._column_offsets[None, :] + np.arange(start, start + length + 1, dtype=np.int64)[:, None]
        block = torch.from_numpy(self.ids[positions].astype(np.int64, copy=False))
        if self.vocab_size is not None and (int(block.min()) < 0 or int(block.max()) >= self.vocab_size):
            raise FastlmError(f"{self.path} holds token ids outside the vocabulary of {self.vocab_size} words "
                              f"(rows {start}-{start + length}); rebuild the token cache")
        return block[:-1], block[1:].reshape(-1)

    def iterate(self, start_batch: int = 0):
        """Yields (batch_index, inputs, targets) from chunk ``start_batch`` to the end of the split."""
        def host_batches():
            for index in range(start_batch, len(self.starts)):
                yield (index, *self.batch(index))
                if (index + 1) % RELEASE_EVERY == 0:
                    self.release_consumed(self.starts[index])
        return to_device(host_batches(), self.device, stage=True)

    def release_consumed(self, row: int) -> None:
        """Drops the mapping's pages that hold only rows before ``row`` in every column."""
        if not hasattr(self._map, "madvise") or row <= self._released:
            return
        page = mmap.PAGESIZE
        item = self.ids.itemsize
        for offset in self._column_offsets:
            begin = self._data_offset + (int(offset) + self._released) * item
            end = self._data_offset + (int(offset) + row) * item
            begin, end = -(-begin // page) * page, end // page * page  # whole pages inside [begin, end)
            if end > begin:
                self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        self._released = row

    def close(self) -> None:
        self.ids = None
        self._map.close()
        self._file.close()


def _map_npy(file, path: Path):
    """(mmap, 1-D integer array viewing it, byte offset of the data) for a .npy file; FastlmError if not one."""
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(file)
        if version not in read_header:
            raise ValueError(f"format version {version} is not supported here")
        shape, _, dtype = read_header[version](file)
    except ValueError as error:
        raise FastlmError(f"{path} is not a .npy file of token ids ({error})") from None
    if len(shape) != 1 or not np.issubdtype(dtype, np.integer) or shape[0] == 0:
        raise FastlmError(f"{path} holds {dtype} {shape}; token ids must be a non-empty 1-D integer array")
    offset = file.tell()
    mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    ids = np.frombuffer(mapping, dtype=dtype, count=shape[0], offset=offset)
    return mapping, ids, offset
