"""Hand-written kernels. This folder, kernels/ at the top of the repository, is installed as ``fastlm.kernels``
(pyproject.toml's package-dir), so its modules import each other as ``fastlm.kernels.<module>``.

The public ops, one recurrent layer each in torch.nn's weight layout, forward and backward:
    from fastlm.kernels import gru, lstm
    y, h_n = gru(x, h0, w_ih, w_hh, b_ih, b_hh)             # kernels/gru_layer.py
    y, h_n, c_n = lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh)   # kernels/lstm_layer.py
Each op file holds the host code, the autograd.Function and the public function; its Triton kernels and
their launchers are in <cell>_step.py (a launch per time step) and <cell>_persistent.py (a launch per
sequence), on common.py and grid_barrier.py; launch.py picks variant and tiles (tiles.py). cpu/ holds the
native CPU loss kernel (C++, built as ``fastlm.kernels._cpu_xent``).
Importing this package imports neither triton nor any kernel module: ``gru`` and ``lstm`` load on first use,
and their first call loads the kernels, compiled or interpreted (``choose_interpreter``).
"""

import importlib
import os
import sys

import torch

# The op files are not named gru.py / lstm.py: importing a submodule sets the package's attribute of its name,
# which would then be the module, not the function.
_OPS = {"gru": "fastlm.kernels.gru_layer", "lstm": "fastlm.kernels.lstm_layer"}
__all__ = ["choose_interpreter", *sorted(_OPS)]


def choose_interpreter() -> None:
    """Without CUDA the kernels can only run through Triton's interpreter, and Triton reads TRITON_INTERPRET when
    it is imported (it decides compiled or interpreted when a function is decorated, its own library included):
    so it is set here, while triton is not loaded yet. Never at import: called where the kernels are first
    loaded (fastlm.kernels.launch.kernel_modules: the first call of an op, the first build of the triton
    backend) and, earlier, by fastlm code about to import torch._dynamo (the compile backend, the example
    step's compile baseline), which imports triton: after that the choice is made."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def __getattr__(name: str):
    """``gru`` and ``lstm``, imported from their op files when first asked for (PEP 562)."""
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
