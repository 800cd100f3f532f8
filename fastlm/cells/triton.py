"""The triton backend: a stack of fastlm.kernels' ``lstm`` / ``gru`` ops, one call per layer.

The ops (kernels/lstm_layer.py, kernels/gru_layer.py) hold the kernels' host code and autograd; how a call
runs, compiled or interpreted, per-step or persistent, on which tiles, is fastlm.kernels.launch's rule.
``TritonStack`` keeps the variant asked for (``variant=``, one of VARIANTS: "per-step", "persistent" or
"auto", the default), hands it and any forced tiles (``launch_config``) to each layer's op, and records what
the op says it ran: ``variant`` and ``variant_reason`` (before any call, what is expected), and
``launch_configs()``, each kernel's variant, tiles, grid and (persistent, compiled) registers and shared
memory: what a benchmark row records. Inputs, state and parameters share one device and one dtype: fp32,
fp16, or bf16 (not interpreted). Building the stack loads the kernels, which decides (and says) whether
they run compiled (CUDA) or through Triton's interpreter (no CUDA: TRITON_INTERPRET=1 is set then, never at
import; fastlm.kernels.choose_interpreter).
"""

import importlib.util
from typing import TYPE_CHECKING, Optional

import torch

from fastlm.cells.base import LayerwiseStack
from fastlm.config import VARIANTS

if TYPE_CHECKING:
    from fastlm.kernels.tiles import LaunchConfig

__all__ = ["CELLS", "VARIANTS", "TritonStack", "probe"]

CELLS = ("lstm", "gru")  # the cells the kernels implement (fastlm.kernels.lstm, gru)


def probe() -> Optional[str]:
    """None when the triton backend can run here; else why not. Cheap: does not import triton."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux x86_64 only)"
    if not torch.cuda.is_available() and importlib.util.find_spec("numpy") is None:
        return "no CUDA device, and running the kernels through the Triton interpreter needs numpy"
    return None


class TritonStack(LayerwiseStack):
    """LSTM or GRU stack on the Triton kernels.

    ``variant``: "per-step", "persistent" or "auto" (default), see fastlm.kernels.launch; kept as
    ``requested_variant``, while ``variant`` and ``variant_reason`` say what the last call ran and why.
    ``launch_config``: None (default) lets fastlm.kernels.tiles choose each kernel's tiles (tuned on a GPU);
    kernel authors and tests may set a LaunchConfig to force the tiles of every kernel (the persistent ones
    too). ``launch_configs()`` reports what the last forward call used.
    """

    backend = "triton"

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 variant: str = "auto"):
        from fastlm.kernels import launch  # loads the kernels, compiled or interpreted (said once in the log)

        launch.check_variant(variant)
        super().__init__(cell, input_size, hidden_size, num_layers, dropout)
        self.interpreted = launch.kernel_modules().interpreted
        self.requested_variant = variant
        self.launch_config: Optional["LaunchConfig"] = None
        self._records: dict[str, dict] = {}

    @property
    def variant(self) -> str:
        """"per-step" or "persistent": what the last call ran; before any call, what is expected."""
        ran = self._records.get(f"{self.cell}_forward")
        return ran["variant"] if ran is not None else self._expected()[0]

    @property
    def variant_reason(self) -> str:
        """Why ``variant`` runs, in words."""
        ran = self._records.get(f"{self.cell}_forward")
        return ran["variant_reason"] if ran is not None else self._expected()[1]

    def _expected(self) -> tuple[str, str]:
        from fastlm.kernels.launch import choose_variant

        variant, reason = choose_variant(self.requested_variant, self.interpreted, 1, self.hidden_size, lambda: None)
        return variant, f"{reason} (expected before the first call; decided at each call)"

    def describe(self) -> str:
        how = ("run by the Triton interpreter (TRITON_INTERPRET=1; slow, for correctness)" if self.interpreted
               else "compiled for CUDA")
        if self.variant == "persistent":
            loop = ("1 launch per layer forward and 1 backward, each walking all time steps (programs exchange h "
                    "through a grid barrier; one program under the interpreter)")
        else:
            loop = "1 fused kernel per time step forward and 1 backward"
        return (f"triton {self.cell} {self.variant}: {loop}, input projection and weight gradients as "
                f"whole-sequence GEMMs; {how} [{self.variant_reason}]")

    def launch_configs(self) -> dict:
        """Per kernel run by the last forward call ("lstm_forward", "lstm_backward", ...; backward only when a
        gradient was needed): what the op recorded (fastlm.kernels.launch.plan_layer): "variant",
        "variant_reason", the tiles, the shape and TF32 flag they were chosen for and their source.
        JSON-ready, for benchmark records."""
        return {kernel: dict(record) for kernel, record in self._records.items()}

    def forward(self, x: torch.Tensor, state=None):
        self._records = {}  # filled by this call's layers: a no-grad call runs no backward kernel
        return super().forward(x, state)

    def run_layer(self, layer: int, x: torch.Tensor, h0: torch.Tensor, c0):
        from fastlm.kernels import gru, lstm

        options = dict(variant=self.requested_variant, tiles=self.launch_config, ran=self._records)
        if self.cell == "lstm":
            return lstm(x, h0, c0, *self.layer_weights(layer), **options)
        y, h_n = gru(x, h0, *self.layer_weights(layer), **options)
        return y, h_n, None
