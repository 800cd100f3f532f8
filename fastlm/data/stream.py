"""Corpora bigger than memory: the vocabulary in memory, each split's ids in a .npy read through a memory map.

``stream_folder`` tokenises a data folder's three files in one pass into the token cache (fastlm.data.cache),
holding only the vocabulary and one piece of text at a time; ``stream_in_memory`` writes an in-memory Corpus
there. Both give a ``StreamedCorpus``, whose ``batches(split, B, bptt, device, columns)`` is a
``TokenFileStream``: the batches of fastlm.data.batching's ``batchify(ids, B)``, in the same order (inputs
[t, B], targets [t * B], int64; t = bptt but for the shorter last chunk), read from the file as needed.
Invariants: the tokens, ids and batches are the in-memory path's (fastlm.data.corpus), read line by line as
the example reads a file; host memory stays flat however long the corpus (consumed pages leave the map);
an id outside the vocabulary is refused when its batch is read. Measurements: docs/streamed-data.md.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import mmap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fastlm.data import cache
from fastlm.data.batching import batch_rows, check_bptt_rows, to_device
from fastlm.data.corpus import EOS, Corpus, Vocabulary
from fastlm.data.split_files import SPLITS, has_no_word, not_utf8, read_blocks, sha256_of
from fastlm.errors import FastlmError

# A piece's tokens cost ~30 bytes of Python objects per byte of text while it is tokenised; 64 KiB pieces
# keep that near 2 MB and, staying in the CPU's caches, tokenise fastest (measured: 16 KiB-4 MiB, Wikitext-2).
TEXT_BLOCK_BYTES = 64 << 10
MAX_CARRY_CHARS = 4 * TEXT_BLOCK_BYTES  # a line longer than this is cut at whitespace rather than held whole


def text_pieces(path: Path, block_bytes: int | None = None):
    """The decoded text of ``path`` as pieces ending in "\\n" (or, inside a very long line, in whitespace),
    read ``block_bytes`` (default TEXT_BLOCK_BYTES) at a time, exactly as the example reads the file.

    The example opens it as strict UTF-8 in text mode (universal newlines: "\\r\\n" and a lone "\\r" become
    "\\n") and makes a line of everything up to each "\\n". Here an incremental decoder joins a character
    split between blocks, a "\\r" at a block's end waits for the next block's "\\n", and a piece is cut after
    its last "\\n", so no line is split (a line too long to hold is cut at whitespace, keeping its words
    whole); the last line is closed with "\\n" when it has none. ``piece.replace("\\n", " <eos> ").split()``
    of every piece, joined, gives the whole file's tokens (fastlm.data.corpus.split_words).

    Raises FastlmError, after the pieces before the problem, if the file cannot be read, is not UTF-8, is
    empty or has only whitespace.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry = ""  # the text after the last cut, not handed out yet
    piece = ""  # the latest piece handed out
    fed = 0  # bytes given to the decoder so far
    has_word = False
    blocks = read_blocks(path, block_bytes or TEXT_BLOCK_BYTES)
    while True:
        block = next(blocks, None)
        final = block is None
        pending = decoder.getstate()[0]
        try:
            text = carry + decoder.decode(block or b"", final)
        except UnicodeDecodeError as error:
            offset = fed - len(pending) + error.start
            raise not_utf8(path, error.object[error.start], offset) from None
        fed += len(block or b"")
        held = ""
        if not final and text.endswith("\r"):
            text, held = text[:-1], "\r"  # it may be the first half of a "\r\n" split between blocks
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if final:
            if not (text or piece).endswith("\n") and (text or piece):
                text += "\n"  # the last line has no newline but is still a line
            cut = len(text)
        else:
            cut = _cut(text)
        if cut:
            piece, carry = text[:cut], text[cut:] + held
            has_word = has_word or not piece.isspace()
            yield piece
        else:
            carry = text + held
        if final:
            break
    if not has_word:
        raise has_no_word(path, empty=fed == 0)


def _cut(text: str) -> int:
    """Where to end the piece handed out now: after the last "\\n"; in a line too long to hold, after its last
    whitespace; else nothing yet (0)."""
    cut = text.rfind("\n") + 1
    if cut or len(text) <= MAX_CARRY_CHARS:
        return cut
    if text[-1].isspace():
        return len(text)
    head = text.rsplit(maxsplit=1)  # from the right: costs only the last word
    return len(text) - len(head[1]) if len(head) == 2 else 0  # no whitespace at all: one word, held whole


_EOS_BETWEEN_SPACES = f" {EOS} "


def tokenize_to_files(paths: dict[str, Path], out_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Writes ``out_dir``/<split>.npy (int64 ids) for each split of ``paths`` (in order); returns the vocabulary
    (words in id order) and each split's token count. Raises FastlmError for a bad file, leaving ``out_dir``
    with partial files for the caller to discard.

    One pass: ids are given in first-seen order over the splits, in order, and a word's id never changes once
    given, so each id is final the moment its token is read and goes straight to disk. Memory is the
    vocabulary plus one piece of text and its tokens, whatever the corpus's size.
    """
    word2idx = defaultdict(itertools.count().__next__)  # a word not seen yet gets the next id
    id_of = word2idx.__getitem__
    counts = {}
    for split, path in paths.items():
        with cache.IdFileWriter(Path(out_dir) / f"{split}.npy") as writer:
            for piece in text_pieces(path):
                words = piece.replace("\n", _EOS_BETWEEN_SPACES).split()
                writer.append(np.fromiter(map(id_of, words), dtype=cache.ID_DTYPE, count=len(words)))
            counts[split] = writer.count
    return list(word2idx), counts


RELEASE_EVERY = 64  # batches between releases of consumed pages


class TokenFileStream:
    """The batches of ``batchify(ids of path, batch_size)``, or of its ``columns`` (a slice: one process's share
    of the batch, fastlm.distributed), read from the file as they are needed.

    ``path`` is a 1-D .npy of any integer dtype (the token cache's ``<split>.npy``), mapped read-only; each
    batch's t+1 rows of every column are one strided copy out of the map. As the columns advance, the pages
    already consumed are released from the mapping (``madvise(MADV_DONTNEED)``) every RELEASE_EVERY batches,
    from where the current pass over the split began (so a new epoch releases too): they stay in the page
    cache, which the kernel may drop, but leave the process's resident memory. On CUDA the batches go
    through fastlm.data.batching.to_device with pinned staging.
    """

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
    try:
        shape, dtype = cache.read_npy_header(file)
    except ValueError as error:
        raise FastlmError(f"{path} is not a .npy file of token ids ({error})") from None
    if len(shape) != 1 or not np.issubdtype(dtype, np.integer) or shape[0] == 0:
        raise FastlmError(f"{path} holds {dtype} {shape}; token ids must be a non-empty 1-D integer array")
    offset = file.tell()
    mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    ids = np.frombuffer(mapping, dtype=dtype, count=shape[0], offset=offset)
    return mapping, ids, offset


@dataclass
class StreamedCorpus:
    """What a trainer asks of an in-memory Corpus (vocab, source, file_sha256, ``batches``), so code that only
    asks for batches runs on either; no ``train``/``valid``/``test`` tensors, on purpose: holding them is what
    a corpus bigger than memory cannot do."""

    vocab: Vocabulary
    id_files: dict[str, Path]  # split -> .npy of its int64 ids (in the token cache)
    token_counts: dict[str, int]  # split -> how many ids its file holds
    source: str  # where it came from, for people, as Corpus.source
    file_sha256: dict[str, str] = field(default_factory=dict)  # split -> SHA-256 of its text file
    mode: ClassVar[str] = "stream"

    def batches(self, split: str, batch_size: int, bptt: int, device, columns: slice | None = None) -> TokenFileStream:
        """The split's batches (or their ``columns``) read from its file: the same batches, in the same order,
        as Corpus.batches on the same ids gives, with the same checks and messages (naming the flags)."""
        rows = batch_rows(self.token_counts[split], batch_size, split)
        if split == "train":
            check_bptt_rows(rows, bptt, split)
        # A valid or test split shorter than bptt is one shorter chunk, as in memory; TokenFileStream
        # itself insists on a full chunk, so it is given the chunk length that yields that one chunk.
        return TokenFileStream(self.id_files[split], batch_size, min(bptt, rows - 1), device,
                               vocab_size=len(self.vocab), columns=columns)


def stream_folder(paths: dict[str, Path], cache_dir: Path, source: str) -> StreamedCorpus:
    """The split files ``paths`` as a StreamedCorpus: from the token cache, or tokenised into it first."""
    file_sha256 = {split: sha256_of(path) for split, path in paths.items()}
    key = cache.entry_key(file_sha256)

    def fill(staging: Path) -> None:
        words, _ = tokenize_to_files(paths, staging)
        (staging / "vocab.json").write_text(Vocabulary.from_words(words).to_json(), encoding="utf-8")

    return _mapped(cache_dir, key, fill, source, file_sha256)


def stream_in_memory(corpus: Corpus, cache_dir=None) -> StreamedCorpus:
    """An in-memory corpus (the generated one, say) written to the token cache and streamed from there, for
    ``--data-mode stream`` on a corpus that has no files of its own."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    ids = {split: getattr(corpus, split).numpy() for split in SPLITS}
    # Keyed by the vocabulary and ids themselves: the "vocab" line keeps these keys apart from files' keys.
    digests = {"vocab": corpus.vocab.digest(), **{split: hashlib.sha256(a.tobytes()).hexdigest()
                                                   for split, a in ids.items()}}

    def fill(staging: Path) -> None:
        (staging / "vocab.json").write_text(corpus.vocab.to_json(), encoding="utf-8")
        for split, split_ids in ids.items():
            np.save(staging / f"{split}.npy", split_ids.astype(np.int64, copy=False))

    return _mapped(cache_dir, cache.entry_key(digests), fill, corpus.source, corpus.file_sha256)


def _mapped(cache_dir: Path, key: str, fill, source: str, file_sha256: dict[str, str]) -> StreamedCorpus:
    """The cache entry ``key`` as a StreamedCorpus, stored with ``fill`` first when it is missing or damaged."""
    mapped = cache.map_entry(cache_dir, key, SPLITS)
    if mapped is None:
        try:
            cache.store_entry(cache_dir, key, fill)
        except OSError as error:
            raise FastlmError(f"cannot write the token cache in {cache_dir} ({error.strerror or error}), which "
                              f"streaming the corpus needs: set FASTLM_CACHE_DIR to a writable folder with room "
                              f"for 8 bytes per token, or use --data-mode memory") from None
        mapped = cache.map_entry(cache_dir, key, SPLITS)
        if mapped is None:  # damaged and could not be removed, or removed by another process meanwhile
            raise FastlmError(f"the token cache entry {Path(cache_dir) / 'tokens' / key} is unusable and could not "
                              f"be rebuilt: remove it, or set FASTLM_CACHE_DIR to another folder")
    return StreamedCorpus(Vocabulary.from_words(mapped.words), mapped.files, mapped.counts, source, file_sha256)
