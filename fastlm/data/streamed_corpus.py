"""A corpus whose token ids stay on disk: the vocabulary in memory, each split a .npy read through a memory map.

It answers what a trainer asks of an in-memory Corpus (vocab, source, file_sha256, ``batches``), so code that
only asks for batches runs on either; it has no ``train``/``valid``/``test`` tensors, on purpose: holding
them is what a corpus bigger than memory cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fastlm.data.batching import batch_rows, check_bptt_rows
from fastlm.data.corpus import Vocabulary
from fastlm.data.token_stream import TokenFileStream


@dataclass
class StreamedCorpus:
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
