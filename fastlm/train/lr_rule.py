"""When the learning rate is annealed (divided by 4) after an epoch's validation: ``--lr-rule``.

``example`` is the PyTorch example's rule: anneal whenever validation did not improve on the best so far.
Over full epochs and the whole validation split that is a real signal; over short epochs validated on a few
batches, validation moves up and down by noise alone, and the example's rule then anneals on noise (an lr
quartered two or three times in a short run stops it learning). ``noise`` anneals only when validation is
worse than the best by more than its noise: the standard error of the validation loss over the batches
evaluated (how far the choice of batches alone moves it). ``noise-final`` is the noise rule plus a schedule over
the run's known length: the lr is also divided by 4 before the last epoch, so a run that is still stepping
past its minimum at a high lr ends with one epoch at a smaller step (the standard study: GRU with nhid 100 at
lr 10 went 273 -> 291 in its sixth epoch under the noise rule; resumed from its fifth epoch at lr 2.5 it
reached 242).
"""

from __future__ import annotations

import math
from typing import Optional

def validation_noise(loss_sum: float, square_sum: float, tokens: float, batches: int) -> Optional[float]:
    """Standard error of a validation loss that is the token-weighted mean of per-batch mean losses:
    ``loss_sum`` = sum(loss_b * tokens_b), ``square_sum`` = sum(loss_b**2 * tokens_b). None for one batch."""
    if batches < 2 or tokens <= 0:
        return None
    mean = loss_sum / tokens
    variance = max(square_sum / tokens - mean * mean, 0.0) * batches / (batches - 1)
    return math.sqrt(variance / batches)


def worse_beyond_noise(val_loss: float, best_val_loss: Optional[float], noise: Optional[float]) -> bool:
    """Validation worse than the best so far by more than its noise (no noise measured: worse at all)."""
    return best_val_loss is not None and val_loss > best_val_loss + (noise or 0.0)


def anneals(rule: str, val_loss: float, best_val_loss: Optional[float], noise: Optional[float],
            last_epoch_next: bool = False) -> bool:
    """Whether the epoch whose validation loss is ``val_loss`` divides the lr by 4 (``best_val_loss``: the best
    before this epoch, None at the first; ``last_epoch_next``: the epoch after this one is the run's last)."""
    if rule == "noise-final" and last_epoch_next:
        return True
    if best_val_loss is None:
        return False
    if rule == "example":
        return not val_loss < best_val_loss
    return worse_beyond_noise(val_loss, best_val_loss, noise)
