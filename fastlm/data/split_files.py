"""The three split files of a data folder: found, sized, hashed and read in bounded pieces.

Both loaders (in memory and streamed) go through here, so a missing, unreadable, empty or non-UTF-8 file
gets the same one-line message whichever path reads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastlm.errors import FastlmError

SPLITS = ("train", "valid", "test")
BLOCK_BYTES = 1 << 20  # a read's size: big enough to amortise the call, small enough to keep memory flat


def split_paths(folder) -> dict[str, Path]:
    """split -> ``folder``/<split>.txt, after checking that the folder and all three files are there."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FastlmError(f"data folder {folder} {what}: expected a folder with train.txt, valid.txt and test.txt")
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise FastlmError(
                f"data folder {path.parent} has no {path.name}: expected train.txt, valid.txt and test.txt there"
            )
    return paths


def text_bytes(paths: dict[str, Path]) -> int:
    """The files' total size in bytes, from their metadata alone (nothing is read)."""
    try:
        return sum(path.stat().st_size for path in paths.values())
    except OSError as error:
        raise cannot_read(error.filename or next(iter(paths.values())), error) from None


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES):
    """The bytes of ``path`` in blocks of at most ``block_bytes``; FastlmError if it cannot be read."""
    try:
        with open(path, "rb") as file:
            while block := file.read(block_bytes):
                yield block
    except OSError as error:
        raise cannot_read(path, error) from None


def sha256_of(path: Path) -> str:
    """SHA-256 (hex) of the file's bytes, read in blocks: the file is never held whole."""
    digest = hashlib.sha256()
    for block in read_blocks(path):
        digest.update(block)
    return digest.hexdigest()


def cannot_read(path, error: OSError) -> FastlmError:
    return FastlmError(f"cannot read {path} ({error.strerror or error}): check its permissions")


def not_utf8(path, byte: int, offset: int) -> FastlmError:
    return FastlmError(f"{path} is not UTF-8 text: byte 0x{byte:02x} at offset {offset} cannot be decoded; "
                       "convert the file to UTF-8")


def has_no_word(path, empty: bool) -> FastlmError:
    # A split needs a word: with only <eos> tokens (or none) there is nothing to learn or measure, and
    # one word already makes two tokens (word, <eos>), so there is at least one target.
    state = "is empty" if empty else "has only whitespace"
    return FastlmError(f"{path} {state}: each of train.txt, valid.txt and test.txt needs at least one word")
