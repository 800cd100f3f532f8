"""How a corpus is held: in memory (today's path, fastest for small corpora) or streamed from disk.

``load_data(folder, cache_dir, mode)`` is the front door for a data folder:

- "memory": the files are read whole, tokenised on all cores and the ids kept as tensors (``Corpus``);
- "stream": the files are hashed and tokenised in bounded pieces, the ids written to the token cache as
  .npy files and read batch by batch through a memory map (``StreamedCorpus``): host memory stays flat
  however big the corpus, at the price of one core for the first tokenisation;
- "auto" (the default): "stream" when the three text files together exceed STREAM_ABOVE_BYTES, else "memory".

Both give the same vocabulary, ids and batches, and share the token cache's entries (same key, same files),
so the mode changes memory use and speed, never a number.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fastlm.data import cache
from fastlm.data.corpus import Corpus, Vocabulary, load_corpus
from fastlm.data.split_files import SPLITS, sha256_of, split_paths, text_bytes
from fastlm.data.stream_tokenize import tokenize_to_files
from fastlm.data.streamed_corpus import StreamedCorpus
from fastlm.errors import FastlmError

DATA_MODES = ("auto", "memory", "stream")
# In memory, tokenising holds every token as a Python string for a moment: ~17 bytes of memory per byte of
# text at the peak, the main process and its forked workers together (measured: docs/streamed-data.md), and
# the ids take 8 bytes a token after. Streamed, memory stays flat, but batches cost ~9 us more each to read
# (a strided copy out of the map, and on CUDA one more copy into pinned memory) and tokenising uses one core.
# 128 MiB of text (~2 GiB at that peak) keeps Wikitext-2 (13 MB) in memory and streams Wikitext-103 (540 MB).
STREAM_ABOVE_BYTES = 128 << 20


def choose_mode(mode: str, total_bytes: int) -> str:
    """The mode, "memory" or "stream", for a corpus of ``total_bytes`` of text under ``mode`` (of DATA_MODES)."""
    check_mode(mode)
    if mode != "auto":
        return mode
    return "stream" if total_bytes > STREAM_ABOVE_BYTES else "memory"


def check_mode(mode: str) -> None:
    if mode not in DATA_MODES:
        raise FastlmError(f"unknown data mode {mode!r}: choose one of {', '.join(DATA_MODES)}")


def load_data(folder, cache_dir=None, mode: str = "auto") -> Corpus | StreamedCorpus:
    """The corpus in ``folder``/{train,valid,test}.txt, in memory or streamed as ``mode`` says (see above).

    ``cache_dir`` defaults to cache.default_cache_dir(); streaming needs it to be writable.
    """
    folder = Path(folder).expanduser()
    paths = split_paths(folder)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    if choose_mode(mode, text_bytes(paths)) == "memory":
        return load_corpus(folder, cache_dir)
    return stream_folder(paths, cache_dir, source=f"folder {folder}")


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
