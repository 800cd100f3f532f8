"""Tokenise split files into .npy files of ids in one streaming pass, holding only the vocabulary.

Ids are given in first-seen order over train, valid and test, in that order, and a word's id never changes
once given, so every id is final the moment its token is read: one pass over the text writes the ids
straight to disk, piece by piece, with no second pass and no list of all tokens. Memory is the vocabulary
plus one piece of text and its tokens (about TEXT_BLOCK_BYTES of text), whatever the corpus's size.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastlm.data.npy_files import ID_DTYPE, IdFileWriter
from fastlm.data.text_stream import text_pieces
from fastlm.data.tokenize import EOS

_EOS_BETWEEN_SPACES = f" {EOS} "


def tokenize_to_files(paths: dict[str, Path], out_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Writes ``out_dir``/<split>.npy (int64 ids) for each split of ``paths`` (in order); returns the vocabulary
    (words in id order) and each split's token count. Raises FastlmError for a bad file, leaving ``out_dir``
    with partial files for the caller to discard."""
    word2idx = defaultdict(itertools.count().__next__)  # a word not seen yet gets the next id
    id_of = word2idx.__getitem__
    counts = {}
    for split, path in paths.items():
        with IdFileWriter(Path(out_dir) / f"{split}.npy") as writer:
            for piece in text_pieces(path):
                words = piece.replace("\n", _EOS_BETWEEN_SPACES).split()
                writer.append(np.fromiter(map(id_of, words), dtype=ID_DTYPE, count=len(words)))
            counts[split] = writer.count
    return list(word2idx), counts
