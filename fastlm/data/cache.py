"""On-disk cache of tokenised corpora, so a second load skips tokenisation.

An entry lives in ``<cache_dir>/tokens/<key>/`` and holds ``vocab.json`` (the words in id order) and one
``<split>.npy`` of int64 token ids per split, whether the in-memory tokeniser or the streaming one
(fastlm.data.stream_tokenize) wrote it: either path reads the other's entries. The key is a hash of the
three files' bytes and FORMAT_VERSION, so editing a file, or changing how tokens are made, simply misses the
cache; nothing is ever invalidated by hand. Entries are written into a temporary folder and renamed into
place, so a reader never sees half an entry; anything unreadable is treated as a miss and rebuilt. For an
in-memory corpus the cache is an optimisation only: a folder that cannot be written to costs speed, never a
run. A streamed corpus is read from its entry, so streaming needs a writable cache (fastlm.data.data_modes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastlm.data.npy_files import id_count

# Bump when tokenisation or the entry layout changes: old entries then stop matching any key.
FORMAT_VERSION = 1

_warned_unwritable: set[str] = set()


def default_cache_dir() -> Path:
    """$FASTLM_CACHE_DIR, else $XDG_CACHE_HOME/fastlm, else ~/.cache/fastlm (empty variables count as unset)."""
    if os.environ.get("FASTLM_CACHE_DIR"):
        return Path(os.environ["FASTLM_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fastlm"
    return Path.home() / ".cache" / "fastlm"


def entry_key(file_sha256: dict[str, str]) -> str:
    """The cache key for a corpus whose split files have these SHA-256 sums (split -> hex digest)."""
    lines = [f"fastlm-tokens-v{FORMAT_VERSION}"] + [f"{split} {digest}" for split, digest in file_sha256.items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass
class CachedTokens:
    words: list[str]  # the vocabulary, in id order
    ids: dict[str, np.ndarray]  # split -> 1-D int64 token ids
    files: dict[str, Path]  # split -> its .npy, for readers that memory-map the ids


@dataclass
class MappedTokens:
    words: list[str]  # the vocabulary, in id order
    files: dict[str, Path]  # split -> its .npy, checked whole but not read (npy_files.id_count)
    counts: dict[str, int]  # split -> how many ids its file holds


def read_entry(cache_dir: Path, key: str, splits: tuple[str, ...]) -> CachedTokens | None:
    """The entry for ``key``, or None when it is absent or unreadable (an unreadable one is removed)."""
    entry = Path(cache_dir) / "tokens" / key
    if not entry.is_dir():
        return None
    try:
        words = _read_words(entry)
        files = {split: entry / f"{split}.npy" for split in splits}
        ids = {split: _load_ids(path, len(words)) for split, path in files.items()}
    except (OSError, ValueError) as error:
        _warn_unreadable(entry, error)
        return None
    return CachedTokens(words, ids, files)


def map_entry(cache_dir: Path, key: str, splits: tuple[str, ...]) -> MappedTokens | None:
    """The entry for ``key`` without reading its ids (for a memory-mapped reader), or None when it is absent
    or unreadable (an unreadable one is removed). Each .npy's header and size are checked here; that its ids
    are inside the vocabulary is checked batch by batch as they are read (TokenFileStream)."""
    entry = Path(cache_dir) / "tokens" / key
    if not entry.is_dir():
        return None
    try:
        words = _read_words(entry)
        files = {split: entry / f"{split}.npy" for split in splits}
        counts = {split: id_count(path) for split, path in files.items()}
    except (OSError, ValueError) as error:
        _warn_unreadable(entry, error)
        return None
    return MappedTokens(words, files, counts)


def _read_words(entry: Path) -> list[str]:
    words = json.loads((entry / "vocab.json").read_text(encoding="utf-8"))
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError("vocab.json is not a list of words")
    if len(set(words)) != len(words):
        raise ValueError("vocab.json repeats a word")
    return words


def _warn_unreadable(entry: Path, error: Exception) -> None:
    warnings.warn(f"token cache entry {entry} is unreadable ({error}); rebuilding it", stacklevel=3)
    _discard(entry)


def _load_ids(path: Path, vocab_size: int) -> np.ndarray:
    ids = np.load(path, allow_pickle=False)
    # Check what a model would trip over later (an id out of range indexes past the embedding).
    if ids.dtype != np.int64 or ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"{path.name} holds {ids.dtype} {ids.shape}, not a non-empty 1-D int64 array")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{path.name} has ids outside the vocabulary of {vocab_size} words")
    return ids


def write_entry(cache_dir: Path, key: str, vocab_json: str, ids: dict[str, np.ndarray]) -> dict[str, Path] | None:
    """Store an entry; returns split -> .npy path, or None (after warning once) if the cache is not writable."""
    def fill(staging: Path) -> None:
        (staging / "vocab.json").write_text(vocab_json, encoding="utf-8")
        for split, split_ids in ids.items():
            np.save(staging / f"{split}.npy", np.ascontiguousarray(split_ids, dtype=np.int64))

    try:
        stored = store_entry(cache_dir, key, fill)
    except OSError as error:
        _warn_unwritable(cache_dir, error)
        return None
    if not stored:
        # Another process stored this key meanwhile (or a stale entry could not be removed): the ids in
        # memory are right either way; only this load goes without .npy paths.
        return None
    return {split: Path(cache_dir) / "tokens" / key / f"{split}.npy" for split in ids}


def store_entry(cache_dir: Path, key: str, fill) -> bool:
    """Builds the entry for ``key``: ``fill(folder)`` writes its files into a staging folder, which is then
    renamed into place. True if this call stored it; False if an entry for ``key`` was there first (another
    process stored it meanwhile, or a stale one could not be removed). OSError if the cache cannot be
    written; whatever ``fill`` raises passes on, after the staging folder is removed."""
    tokens_dir = Path(cache_dir) / "tokens"
    entry = tokens_dir / key
    tokens_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=tokens_dir))
    try:
        fill(staging)
        os.rename(staging, entry)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and entry.is_dir():
            return False
        raise
    return True


def _discard(entry: Path) -> None:
    # Rename first so that a concurrent reader sees a miss, not a folder being emptied under it.
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}")
    try:
        os.rename(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _warn_unwritable(cache_dir: Path, error: OSError) -> None:
    if str(cache_dir) in _warned_unwritable:
        return
    _warned_unwritable.add(str(cache_dir))
    warnings.warn(
        f"cannot write the token cache in {cache_dir} ({error.strerror or error}); going on without it. "
        "Set FASTLM_CACHE_DIR to a writable folder to make later loads fast",
        stacklevel=3,
    )
