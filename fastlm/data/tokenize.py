"""Text -> (first-seen vocabulary, token ids), the example's tokenisation, spread over the CPU's cores.

Tokenising is bound by making one Python string per token and one dict lookup per token, so a single
process cannot go much faster. Large texts are therefore cut at line ends into pieces that forked worker
processes tokenise with a local vocabulary each; the main process then merges the local vocabularies in
piece order (which is exactly the first-seen order over the whole stream) and remaps the local ids with one
array lookup per piece.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import defaultdict

import numpy as np

EOS = "<eos>"
PARALLEL_MIN_CHARS = 1 << 20  # below this, forking costs more than it saves
_pieces: list[str] = []  # set before forking, so workers read their piece without it being pickled


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


def _local_ids(text: str) -> tuple[list[str], np.ndarray]:
    """(words in first-seen order, ids into that list) for one piece of text."""
    word2idx = defaultdict(itertools.count().__next__)  # a missing word gets the next id
    words = split_words(text)
    ids = np.fromiter(map(word2idx.__getitem__, words), dtype=np.int32, count=len(words))
    return list(word2idx), ids


def _worker(index: int):
    return _local_ids(_pieces[index])


def _cut(text: str, parts: int) -> list[str]:
    """``text`` in about ``parts`` pieces, each cut just after a newline so no line is split."""
    pieces, start = [], 0
    step = max(len(text) // parts, 1)
    while start < len(text):
        end = text.find("\n", start + step)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces or [text]


def tokenize(texts: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """The vocabulary in first-seen order over ``texts`` (in order) and each text's ids (int64)."""
    global _pieces
    workers = min(os.cpu_count() or 1, 8)
    parallel = (workers > 1 and sum(map(len, texts)) >= PARALLEL_MIN_CHARS
                and "fork" in multiprocessing.get_all_start_methods())
    if parallel:
        # Cutting only the large texts keeps a text's pieces contiguous and in order.
        owner, pieces = [], []
        for which, text in enumerate(texts):
            parts = _cut(text, 2 * workers) if len(text) >= PARALLEL_MIN_CHARS // 4 else [text]
            pieces += parts
            owner += [which] * len(parts)
        _pieces = pieces
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.map(_worker, range(len(pieces)))
        finally:
            _pieces = []
    else:
        owner, results = list(range(len(texts))), [_local_ids(text) for text in texts]
    vocab: dict[str, int] = {}
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for which, (local_words, local_ids) in zip(owner, results):
        for word in local_words:
            vocab.setdefault(word, len(vocab))
        to_global = np.fromiter(map(vocab.__getitem__, local_words), dtype=np.int64, count=len(local_words))
        per_text[which].append(to_global[local_ids])
    ids = [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in per_text]
    return list(vocab), ids
