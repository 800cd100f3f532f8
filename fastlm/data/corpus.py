"""Vocabulary and corpus, tokenised exactly as the PyTorch word_language_model example does it, but fast.

The example reads each file as strict UTF-8 text (universal newlines), turns every line into
``line.split() + ['<eos>']`` and gives ids in first-seen order over train, valid and test. Here
``split_words`` splits a whole text at once (each newline an ``<eos>`` token) and ``tokenize`` assigns the ids
on all cores; the tokens and ids come out identical. A ``Vocabulary`` maps words to ids 0..V-1 and back; a
``Corpus`` holds it and each split as a 1-D int64 tensor of ids in [0, V), and gives a split's batches
(``batches``, fastlm.data.batching). ``load_corpus`` reads a data folder through the token cache
(fastlm.data.cache); fastlm.data.stream is the same corpus with its ids left on disk.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import multiprocessing
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fastlm.data import cache
from fastlm.data.batching import BatchStreamer, batchify, check_bptt
from fastlm.data.split_files import SPLITS, cannot_read, has_no_word, not_utf8, split_paths

EOS = "<eos>"
PARALLEL_MIN_CHARS = 1 << 20  # below this, forking costs more than it saves
_texts: list[str] = []  # set before forking, so workers read their piece without it being pickled


def split_words(text: str) -> list[str]:
    """The tokens of ``text`` (newlines already universal, as text-mode reading gives them), '<eos>' per line.

    Equal to ``[w for line in lines for w in line.split() + ['<eos>']]`` where lines end only at '\\n', as file
    iteration yields them (str.splitlines would also split at \\x0c, \\u2028 and others, which are only
    whitespace here). Surrounding the marker with spaces keeps it a token of its own; a literal '<eos>'
    word in the text is the same token in the example too.
    """
    words = text.replace("\n", f" {EOS} ").split()
    if text and not text.endswith("\n"):
        words.append(EOS)  # the last line has no newline but is still a line
    return words


Segment = tuple[int, int, int]  # (which text, start, end): a run of whole lines of one text


def _local_ids(segments: list[Segment]) -> tuple[list[str], list[np.ndarray]]:
    """(words in first-seen order over the segments, each segment's ids into that list)."""
    word2idx = defaultdict(itertools.count().__next__)  # a missing word gets the next id
    ids = []
    for which, start, end in segments:
        words = split_words(_texts[which][start:end])
        ids.append(np.fromiter(map(word2idx.__getitem__, words), dtype=np.int32, count=len(words)))
    return list(word2idx), ids


def _plan(texts: list[str], tasks: int) -> list[list[Segment]]:
    """The texts, in order, as ``tasks`` runs of about equal length, each cut just after a newline.

    One task per worker keeps the merge small: each task's local vocabulary costs the main process a hash
    of every word in it (strings arrive unpickled, without their cached hash).
    """
    offsets = list(itertools.accumulate(map(len, texts), initial=0))  # where each text starts, then the total
    cuts = set()
    for k in range(1, tasks):
        target = k * offsets[-1] // tasks
        which = min(bisect.bisect_right(offsets, target) - 1, len(texts) - 1)
        newline = texts[which].find("\n", target - offsets[which])
        cuts.add(offsets[which + 1] if newline < 0 else offsets[which] + newline + 1)
    bounds = sorted(cuts | {0, offsets[-1]})
    plan = []
    for lo, hi in zip(bounds, bounds[1:]):
        plan.append([(which, max(lo, first) - first, min(hi, offsets[which + 1]) - first)
                     for which, first in enumerate(offsets[:-1]) if max(lo, first) < min(hi, offsets[which + 1])])
    return plan or [[]]


def tokenize(texts: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """The vocabulary in first-seen order over ``texts`` (in order) and each text's ids (int64).

    Tokenising is bound by making one Python string and one dict lookup per token, so one process cannot go
    much faster: a large input is cut at line ends into one run of lines per core (at most 8), forked workers
    tokenise the runs with a local vocabulary each, and the main process merges the local vocabularies in run
    order (exactly the first-seen order over the whole input) and remaps the local ids with one array lookup
    per text segment.
    """
    global _texts
    workers = min(os.cpu_count() or 1, 8)
    parallel = (workers > 1 and sum(map(len, texts)) >= PARALLEL_MIN_CHARS
                and "fork" in multiprocessing.get_all_start_methods())
    plan = _plan(texts, workers if parallel else 1)
    _texts = texts
    try:
        if len(plan) > 1:
            # The main process tokenises the first run itself while forked workers do the others.
            with multiprocessing.get_context("fork").Pool(len(plan) - 1) as pool:
                others = pool.map_async(_local_ids, plan[1:])
                results = [_local_ids(plan[0]), *others.get()]
        else:
            results = [_local_ids(task) for task in plan]
    finally:
        _texts = []
    vocab: dict[str, int] = {}
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for task, (local_words, local_ids) in zip(plan, results):
        new = [word for word in local_words if word not in vocab]  # in the task's first-seen order
        vocab.update(zip(new, range(len(vocab), len(vocab) + len(new))))
        to_global = np.fromiter(map(vocab.__getitem__, local_words), dtype=np.int64, count=len(local_words))
        for (which, _, _), ids in zip(task, local_ids):
            per_text[which].append(to_global[ids])
    ids = [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in per_text]
    return list(vocab), ids


class Vocabulary:
    """The words of a corpus; ``idx2word[i]`` has id ``i`` and ``word2idx`` is its inverse."""

    def __init__(self, idx2word: list[str]):
        self.idx2word = idx2word
        self.word2idx = dict(zip(idx2word, range(len(idx2word))))
        if len(self.word2idx) != len(idx2word):
            raise ValueError("a vocabulary cannot hold the same word twice")

    @classmethod
    def from_words(cls, words) -> Vocabulary:
        """A vocabulary with these words, in this order, as ids 0, 1, ..."""
        return cls(list(words))

    def __len__(self) -> int:
        return len(self.idx2word)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def to_json(self) -> str:
        """The words in id order as a JSON list: unambiguous for any word, and what digest() hashes."""
        return json.dumps(self.idx2word, ensure_ascii=False, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 (hex) of the words in id order, to check that a checkpoint was trained on this vocabulary."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    vocab: Vocabulary
    train: torch.Tensor  # 1-D int64 token ids
    valid: torch.Tensor
    test: torch.Tensor
    source: str  # where it came from, for people: "Wikitext-2 from /data/wt2", "generated toy corpus", ...
    file_sha256: dict[str, str] = field(default_factory=dict)  # split -> SHA-256 of its file; empty if not from files
    id_files: dict[str, Path] = field(default_factory=dict)  # split -> cached .npy of its ids, for memory-mapping
    mode: ClassVar[str] = "memory"  # how its batches are read (fastlm.data.stream's corpus has "stream")

    def batches(self, split: str, batch_size: int, bptt: int, device, columns: slice | None = None) -> BatchStreamer:
        """The split's batches, batchified in memory, or the ``columns`` of them (one process's share of the
        batch, fastlm.distributed). The train split must hold at least one bptt-long chunk (valid and test may
        be shorter: their one chunk is then shorter), as the trainer has always asked."""
        source = batchify(getattr(self, split), batch_size, split)
        if split == "train":
            check_bptt(source, bptt, split)
        if columns is not None:
            source = source[:, columns].contiguous()
        return BatchStreamer(source, bptt, device)


def corpus_from_texts(texts: dict[str, str], source: str) -> Corpus:
    """Tokenise train, valid and test texts (keys of ``texts``) into a Corpus."""
    words, ids = tokenize([texts[split] for split in SPLITS])
    return Corpus(Vocabulary.from_words(words), *(torch.from_numpy(a) for a in ids), source=source)


def load_corpus(folder, cache_dir=None, *, use_cache: bool = True) -> Corpus:
    """The corpus in ``folder``/{train,valid,test}.txt, through the token cache in ``cache_dir``.

    ``cache_dir`` defaults to cache.default_cache_dir(); ``use_cache=False`` always tokenises afresh.
    """
    folder = Path(folder).expanduser()
    raw = {split: _read_split(path) for split, path in split_paths(folder).items()}
    file_sha256 = {split: hashlib.sha256(data).hexdigest() for split, data in raw.items()}
    source = f"folder {folder}"
    if not use_cache:
        return _tokenise(folder, raw, file_sha256, source)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    # The key covers the files' bytes, so a hit stands for files that once passed every check below.
    key = cache.entry_key(file_sha256)
    cached = cache.read_entry(cache_dir, key, SPLITS)
    if cached is not None:
        tensors = (torch.from_numpy(cached.ids[split]) for split in SPLITS)
        return Corpus(Vocabulary.from_words(cached.words), *tensors, source, file_sha256, cached.files)
    corpus = _tokenise(folder, raw, file_sha256, source)
    ids = {split: getattr(corpus, split).numpy() for split in SPLITS}
    corpus.id_files = cache.write_entry(cache_dir, key, corpus.vocab.to_json(), ids) or {}
    return corpus


def _read_split(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise cannot_read(path, error) from None


def _tokenise(folder: Path, raw: dict[str, bytes], file_sha256: dict[str, str], source: str) -> Corpus:
    corpus = corpus_from_texts({split: _text_of(folder / f"{split}.txt", data) for split, data in raw.items()}, source)
    corpus.file_sha256 = file_sha256
    return corpus


def _text_of(path: Path, data: bytes) -> str:
    """``data`` as the example reads a file (strict UTF-8, universal newlines), checked to hold a word."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(path, data[error.start], error.start) from None
    if not text or text.isspace():  # (not text.strip(), without copying the text)
        raise has_no_word(path, empty=not text)
    if "\r" in text:
        # Text-mode reading turns \r\n and a lone \r into \n; only then are lines split.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text
