"""The language model: embedding -> dropout -> recurrent stack (fastlm.cells) -> dropout -> decoder, and the
decoders' losses (the fused, chunked linear + cross-entropy; the opt-in adaptive softmax)."""

from fastlm.model.adaptive import AdaptiveDecoder
from fastlm.model.fused_loss import linear_cross_entropy
from fastlm.model.loss_chunks import Chunking
from fastlm.model.rnnlm import RNNLM, detach_state, dtype_name, map_state

__all__ = ["RNNLM", "AdaptiveDecoder", "Chunking", "detach_state", "dtype_name", "linear_cross_entropy", "map_state"]
