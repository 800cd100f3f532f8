"""Text -> (first-seen vocabulary, token ids), the example's tokenisation, spread over the CPU's cores.

Tokenising is bound by making one Python string per token and one dict lookup per token, so a single
process cannot go much faster. Large inputs are therefore cut at line ends into one run of lines per core,
which forked worker processes tokenise with a local vocabulary each; the main process then merges the local
vocabularies in run order (which is exactly the first-seen order over the whole stream) and remaps the
local ids with one array lookup per text segment.
"""

from __future__ import annotations

import bisect
import itertools
import multiprocessing
import os
from collections import defaultdict

import numpy as np

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
    """The vocabulary in first-seen order over ``texts`` (in order) and each text's ids (int64)."""
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
