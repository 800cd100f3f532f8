"""The adaptive softmax (opt-in, a different model): frequent words get the full hidden size, rare words a
projection to a smaller one, in clusters; most tokens then touch only the small head matrix.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastlm.errors import FastlmError

WIKITEXT2_VOCAB = 33_278
# The head holds the 2,000 most frequent words (77% of Wikitext-2's training tokens), the first tail
# cluster the next 8,000 (up to 93%), the last the remaining 23,278.
WIKITEXT2_CUTOFFS = (2_000, 10_000)


def default_cutoffs(vocab_size: int) -> list[int]:
    """Wikitext-2's cutoffs, scaled in proportion for other vocabulary sizes."""
    scaled = sorted({max(1, round(c * vocab_size / WIKITEXT2_VOCAB)) for c in WIKITEXT2_CUTOFFS})
    return [c for c in scaled if c <= vocab_size - 1] or [1]


class AdaptiveDecoder(torch.nn.Module):
    """torch.nn.AdaptiveLogSoftmaxWithLoss over words ranked by frequency.

    The vocabulary is in first-seen order (the example's), so ``rank`` maps a word id to its frequency
    rank (0 = most frequent) before the clusters are looked up; ``set_word_counts`` fills it from training
    counts and the state_dict carries it. Without counts the ranks are the ids themselves.
    """

    def __init__(self, hidden_size: int, vocab_size: int, cutoffs: Optional[list[int]] = None,
                 div_value: float = 4.0):
        super().__init__()
        cutoffs = list(cutoffs) if cutoffs else default_cutoffs(vocab_size)
        if cutoffs[-1] > vocab_size - 1:
            raise FastlmError(f"--cutoffs {','.join(map(str, cutoffs))} must stay below the vocabulary size "
                              f"({vocab_size} words)")
        if hidden_size // int(div_value ** len(cutoffs)) < 1:
            raise FastlmError(f"the adaptive softmax's last cluster would have {hidden_size} // "
                              f"{int(div_value ** len(cutoffs))} = 0 units: use a larger --nhid or fewer --cutoffs")
        self.softmax = torch.nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, cutoffs, div_value=div_value)
        self.register_buffer("rank", torch.arange(vocab_size))

    @property
    def cutoffs(self) -> list[int]:
        return list(self.softmax.cutoffs[:-1])

    def set_word_counts(self, counts: torch.Tensor) -> None:
        order = torch.argsort(counts.to(self.rank.device), descending=True, stable=True)
        self.rank[order] = torch.arange(order.numel(), device=self.rank.device)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean NLL of ``targets`` [N] given hidden [N, H]."""
        return self.softmax(hidden, self.rank[targets]).loss

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> log-probabilities [N, V] in word-id order."""
        return self.softmax.log_prob(hidden).index_select(1, self.rank)
