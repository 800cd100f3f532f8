"""bf16 training with fp32 master weights: the model computes in a bf16 copy of itself.

The trainer's model keeps its fp32 parameters (the masters: what is clipped, updated, evaluated and
checkpointed). ``LowPrecisionCopy`` holds a copy of the model cast to bf16 (the compute model) and, per step:
1. ``sync_weights``: masters -> compute weights, one foreach copy that rounds to bf16. Done at the start of
   every step, so weights loaded into the masters between steps (resume, the best model) are always seen;
2. the step runs forward and backward on the compute model: embedding, recurrence (cuDNN or Triton
   alike, since the weights themselves are bf16), decoder GEMMs in bf16 with fp32 accumulation, softmax in
   fp32 (fastlm.model.fused_loss);
3. ``gradients_to_masters``: the bf16 gradients, widened to fp32, become the masters' gradients; clipping
   and the SGD update then run in fp32 on the masters.
Everything is in place on fixed tensors, so the whole step can be captured as a CUDA graph.

Why a copy and not autocast: torch's autocast runs cuDNN RNNs in fp16 (not bf16) and re-casts their
weights at every call, and it leaves a Triton stack's recurrence in fp32 (only its input projection is a
torch GEMM). A cast copy makes every part bf16 on every backend, and cuDNN's bf16 weights stay in the one
flat buffer it wants (``.to()`` flattens them once; in-place copies keep them there).
"""

from __future__ import annotations

import copy

import torch

from fastlm.model import RNNLM, map_state


class LowPrecisionCopy:
    def __init__(self, model: RNNLM, dtype: torch.dtype):
        self.masters = list(model.parameters())  # tied weights appear once, in the copy too
        self.compute = copy.deepcopy(model).to(dtype)
        self.dtype = dtype
        self.weights = list(self.compute.parameters())
        # Integer buffers (the adaptive decoder's word ranks) are shared, not copied: the masters' ones may be
        # refilled after this copy is made (set_word_counts).
        for (name, buffer), (_, original) in zip(self.compute.named_buffers(), model.named_buffers(), strict=True):
            if not buffer.is_floating_point():
                module_name, _, attribute = name.rpartition(".")
                setattr(self.compute.get_submodule(module_name), attribute, original)
        self.master_model = model

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Masters -> compute weights (rounded to bf16), and the same train/eval mode (dropout)."""
        torch._foreach_copy_(self.weights, self.masters)
        if self.compute.training != self.master_model.training:
            self.compute.train(self.master_model.training)

    def state(self, state):
        """The hidden state in the compute dtype (a no-op once it is: the step returns it so)."""
        return map_state(lambda s: s if s.dtype == self.dtype else s.to(self.dtype), state)

    @torch.no_grad()
    def gradients_to_masters(self) -> None:
        """Each compute weight's gradient, widened to fp32, becomes its master's; the bf16 ones are dropped."""
        for master, weight in zip(self.masters, self.weights):
            master.grad = weight.grad.float() if weight.grad is not None else None
            weight.grad = None
