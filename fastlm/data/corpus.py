"""Vocabulary and corpus, tokenised exactly as the PyTorch word_language_model example does it, but fast.

The example reads each file as UTF-8 text (universal newlines), turns every line into
``line.split() + ['<eos>']`` and builds the vocabulary over train, valid and test in first-seen order, making
a tensor per line. Here the whole text is split at once, with each newline replaced by an ``<eos>`` token,
and one pass over the tokens assigns ids in first-seen order; the tokens and ids come out identical.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from fastlm.data import cache
from fastlm.data.batching import BatchStreamer, batchify, check_bptt
from fastlm.data.split_files import SPLITS, cannot_read, has_no_word, not_utf8, split_paths
from fastlm.data.tokenize import EOS, split_words, tokenize  # noqa: F401  (re-exported)


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
    mode: ClassVar[str] = "memory"  # how its batches are read (fastlm.data.streamed_corpus has "stream")

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
