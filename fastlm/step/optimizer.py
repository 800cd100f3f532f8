"""The optimizer a step updates the weights with: plain SGD (the example's, the default) or AdamW.

- ``sgd`` without weight decay is the example's update, ``p -= lr * grad``: the fast step does it itself as one
  foreach call (fastlm.step.fast), and the torch SGD object only holds the lr for the schedule and checkpoints.
- ``sgd`` with weight decay, and ``adamw``, run torch's optimizer, with torch's fused kernels where torch has
  them for the device (CPU, CUDA, MPS, XPU in torch 2.13), else its foreach ones. The fused kernels also
  skip a step on the device when told its gradients were not finite (``found_inf``), which --skip-nonfinite
  needs: a skipped AdamW step must leave the moments and the step count as they were, not only the weights.

The optimizer always holds the parameters it is given: the model's own fp32 weights, in bf16 too (only the
decoder's GEMMs run in bf16, on casts: fastlm.precision), so AdamW's moments are fp32 too. Its state_dict goes
into checkpoints, so a resumed run continues with the same moments and step counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from fastlm.errors import FastlmError

# torch's AdamW default, which the example's --use-optimizer takes as it is (it passes only the lr).
ADAMW_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class OptimizerSpec:
    """What --optimizer, --weight-decay and --betas ask for. ``weight_decay`` None: the optimizer's own default
    (SGD 0, AdamW 0.01); ``betas`` None: torch's (0.9, 0.999)."""

    name: str = "sgd"
    weight_decay: Optional[float] = None
    betas: Optional[tuple] = None

    @classmethod
    def of(cls, train_config) -> "OptimizerSpec":
        betas = train_config.betas
        return cls(train_config.optimizer, train_config.weight_decay, tuple(betas) if betas is not None else None)

    @property
    def plain_sgd(self) -> bool:
        """The example's update, p -= lr * grad, which the fast step does itself."""
        return self.name == "sgd" and not self.weight_decay


def build_optimizer(params: list, spec: OptimizerSpec, lr: float) -> torch.optim.Optimizer:
    if spec.name not in ("sgd", "adamw"):
        raise FastlmError(f"--optimizer must be sgd or adamw, got {spec.name!r}")
    kind = "fused" if params[0].device.type in _get_fused_kernels_supported_devices() else "foreach"
    if spec.plain_sgd:  # the step updates the weights itself; this object holds the lr
        return torch.optim.SGD(params, lr=lr)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=spec.weight_decay, **{kind: True})
    weight_decay = ADAMW_WEIGHT_DECAY if spec.weight_decay is None else spec.weight_decay
    return torch.optim.AdamW(params, lr=lr, betas=spec.betas or (0.9, 0.999), weight_decay=weight_decay,
                             **{kind: True})


# How torch runs an optimizer on this device: chosen when it is built, never taken from a checkpoint (a run
# trained on CUDA may resume on a CPU).
KERNEL_SETTINGS = ("fused", "foreach", "capturable")


def load_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimizer state (moments, step counts, lr) into ``optimizer``, keeping the kernels it was
    built with for this device."""
    kept = [{name: group[name] for name in KERNEL_SETTINGS if name in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, kept):
        group.update(settings)


def detached_state(state: dict) -> dict:
    """An optimizer state_dict whose tensors (AdamW's moments, step counts) are copies, for a snapshot that
    later steps must not change."""
    copied = {index: {name: value.detach().clone() if torch.is_tensor(value) else value
                      for name, value in per_param.items()}
              for index, per_param in state["state"].items()}
    return {**state, "state": copied}


def implementation(optimizer: torch.optim.Optimizer, plain_sgd: bool) -> str:
    """How the update runs, for reports: "foreach p -= lr*grad" (the fast step's own SGD), or torch's
    "fused", "foreach" or "for-loop" kernels."""
    if plain_sgd:
        return "foreach p -= lr*grad"
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"


def describe(optimizer: torch.optim.Optimizer, plain_sgd: bool) -> dict:
    """What ran, for how_it_ran and the run header: name, kernels, weight decay and (AdamW) betas."""
    group = optimizer.param_groups[0]
    name = "adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd"
    described = {"optimizer": name, "optimizer_impl": implementation(optimizer, plain_sgd),
                 "weight_decay": group["weight_decay"]}
    if name == "adamw":
        described["betas"] = list(group["betas"])
    return described
