"""On-disk cache of tokenised corpora, so a second load skips tokenisation.

An entry lives in ``<cache_dir>/tokens/<key>/`` and holds ``vocab.json`` (the words in id order, a JSON list)
and one ``<split>.npy`` per split: a non-empty 1-D int64 array of ids, each in [0, len(vocab)). The in-memory
tokeniser (fastlm.data.corpus) and the streaming one (fastlm.data.stream) write the same files, so either path
reads the other's entries. The key hashes the three text files' bytes and FORMAT_VERSION: an edited file or a
changed tokenisation misses the cache; nothing is invalidated by hand. An entry is written into a staging
folder and renamed into place, so a reader never sees half of one; an unreadable entry is a miss, removed and
rebuilt. ``IdFileWriter`` writes a .npy piece by piece and ``id_count`` checks one without reading its ids.
For an in-memory corpus the cache only saves time (an unwritable folder costs speed, never a run); a
streamed corpus is read from its entry, so streaming needs a writable cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when tokenisation or the entry layout changes: old entries then stop matching any key.
FORMAT_VERSION = 1
ID_DTYPE = np.dtype(np.int64)  # what an entry's .npy files hold
_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

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
    files: dict[str, Path]  # split -> its .npy, checked whole but not read (id_count)
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
    are inside the vocabulary is checked batch by batch as they are read (fastlm.data.stream)."""
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


# .npy files of ids, written piece by piece and checked without being read. A header is padded to a fixed 128
# bytes for any 1-D length up to 10^18 (numpy pads it so), so the final header of a file whose length was not
# known in advance fits exactly where the first one, for length 0, was written.
def _header(count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(ID_DTYPE), "fortran_order": False, "shape": (count,)}
    )
    return buffer.getvalue()


class IdFileWriter:
    """Writes a 1-D int64 .npy from pieces: ``append`` each piece, ``close`` to fix the header."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.count = 0
        self._file = open(self.path, "wb")
        self._file.write(_header(0))

    def append(self, ids: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(ids, dtype=ID_DTYPE).data)
        self.count += len(ids)

    def close(self) -> None:
        header = _header(self.count)
        if len(header) != len(_header(0)):  # only past 10^18 ids
            raise ValueError(f"{self.path}: {self.count} ids do not fit the reserved .npy header")
        self._file.seek(0)
        self._file.write(header)
        self._file.close()

    def __enter__(self) -> IdFileWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()  # the caller discards the half-written file


def read_npy_header(file) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of the .npy file open at its start, leaving ``file`` at the data; ValueError if it is
    not a .npy file of a format version read here. Each caller checks what it accepts."""
    version = np.lib.format.read_magic(file)
    if version not in _READ_HEADER:
        raise ValueError(f"format version {version} is not read here")
    shape, _, dtype = _READ_HEADER[version](file)
    return shape, dtype


def id_count(path: Path) -> int:
    """How many ids the .npy at ``path`` holds; ValueError unless it is a whole, non-empty 1-D int64 array."""
    with open(path, "rb") as file:
        try:
            shape, dtype = read_npy_header(file)
        except ValueError as error:
            raise ValueError(f"{Path(path).name}: {error}") from None
        if dtype != ID_DTYPE or len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"{Path(path).name} holds {dtype} {shape}, not a non-empty 1-D int64 array")
        expected = file.tell() + shape[0] * ID_DTYPE.itemsize
        actual = os.fstat(file.fileno()).st_size
    if actual != expected:
        raise ValueError(f"{Path(path).name} has {actual} bytes where its header promises {expected}")
    return shape[0]
