"""Batches streamed from a token-id file through a memory map: corpora bigger than memory.

``TokenFileStream`` gives the batches ``BatchStreamer`` gives for ``batchify(ids, B)`` (the example's
layout: column b is the b-th contiguous slice of the corpus, chunks of bptt rows, the last one shorter),
but reads each batch's t+1 rows of every column straight from a .npy file of token ids (the token cache's
``<split>.npy``, any integer dtype), so the split is never loaded as a whole.

Host memory stays flat however long the corpus is: the file is mapped read-only and, as the columns
advance, the pages already consumed are released from the mapping (``madvise(MADV_DONTNEED)``, every
RELEASE_EVERY batches, from where the current pass over the split began, so a new epoch releases too); they
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
    """The batches of ``batchify(ids of path, batch_size)``, or of its ``columns`` (a slice: one process's share
    of the batch, fastlm.distributed), read from the file as they are needed."""

    def __init__(self, path, batch_size: int, bptt: int, device: torch.device, vocab_size: int | None = None,
                 columns: slice | None = None):
        self.path = Path(path)
        self.batch_size, self.bptt, self.device = batch_size, bptt, torch.device(device)
        self.vocab_size = vocab_size
        self._map = None
        try:
            with open(self.path, "rb") as file:  # the mapping keeps a descriptor of its own
                self._map, self.ids, self._data_offset = _map_npy(file, self.path)
            self.rows = self.ids.size // batch_size
            if self.rows < 2:
                raise FastlmError(f"batch size {batch_size} is too large for {self.path} ({self.ids.size} tokens): "
                                  f"each column needs at least 2 tokens")
            if bptt > self.rows - 1:
                raise FastlmError(f"--bptt {bptt} is larger than {self.path} allows at batch size {batch_size} "
                                  f"({self.rows - 1} steps per column); use a smaller --bptt or --batch-size")
        except Exception:
            self.close()
            raise
        self.starts = range(0, self.rows - 1, bptt)
        columns = slice(None) if columns is None else columns
        self._column_offsets = np.arange(batch_size, dtype=np.int64)[columns] * self.rows
        # The batchified [rows, B] layout as a view of the mapped file (column b starts at token b * rows):
        # slicing it reads just a batch's rows, and copying the slice is one strided copy, no index arrays.
        item = self.ids.itemsize
        self._layout = np.lib.stride_tricks.as_strided(self.ids, shape=(self.rows, batch_size),
                                                       strides=(item, self.rows * item), writeable=False)[:, columns]

    @property
    def column_count(self) -> int:
        """Columns of each batch this stream gives: the batch size, or the share of it in ``columns``."""
        return len(self._column_offsets)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [t, B], targets [t * B]) of chunk ``index`` as int64 CPU tensors (B: ``column_count``)."""
        start = self.starts[index]
        length = min(self.bptt, self.rows - 1 - start)
        rows = np.array(self._layout[start:start + length + 1], dtype=np.int64, order="C")
        if self.vocab_size is not None and (rows.min() < 0 or rows.max() >= self.vocab_size):
            raise FastlmError(f"{self.path} holds token ids outside the vocabulary of {self.vocab_size} words "
                              f"(rows {start}-{start + length}); rebuild the token cache")
        block = torch.from_numpy(rows)
        return block[:-1], block[1:].reshape(-1)

    def iterate(self, start_batch: int = 0, count: int | None = None):
        """Yields (batch_index, inputs, targets) from chunk ``start_batch`` to the end of the split, or, with
        ``count``, that many chunks, going round to the split's start after its last one (as BatchStreamer)."""
        indices = (range(start_batch, len(self.starts)) if count is None else
                   ((start_batch + j) % len(self.starts) for j in range(count)))

        def host_batches():
            released, previous = None, None  # where this pass over the split began releasing; the last index
            for number, index in enumerate(indices):
                if previous is not None and index < previous:  # round to the split's start: the pass is over
                    self.release_rows(released, self.rows)
                if previous is None or index < previous:
                    released = self.starts[index]
                yield (index, *self.batch(index))
                previous = index
                if (number + 1) % RELEASE_EVERY == 0:
                    self.release_rows(released, self.starts[index])
                    released = self.starts[index]
        return to_device(host_batches(), self.device, stage=True)

    def release_rows(self, begin_row: int, end_row: int) -> None:
        """Drops the mapping's pages of rows ``begin_row`` up to ``end_row`` (not included) of every column.

        A page is dropped whole, so the one holding ``end_row`` stays; the one holding ``begin_row`` goes
        even though it may hold earlier rows too, which is what lets consecutive calls leave nothing behind.
        Dropping is always safe: the mapping is read-only, and a page read again is faulted in from the file.
        """
        if not hasattr(self._map, "madvise") or end_row <= begin_row:
            return
        page = mmap.PAGESIZE
        item = self.ids.itemsize
        for offset in self._column_offsets:
            begin = self._data_offset + (int(offset) + begin_row) * item
            end = self._data_offset + (int(offset) + end_row) * item
            begin, end = begin // page * page, end // page * page  # the pages that start before end_row's
            if end > begin:
                self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        self.ids = self._layout = None
        if self._map is not None:
            self._map.close()


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
