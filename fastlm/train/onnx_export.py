"""The best model of a run as an ONNX file (`fastlm export RUN_DIR --onnx PATH`, `fastlm train --onnx-export PATH`).

The file computes one chunk of the model, as `fastlm generate` and evaluation do:

    inputs   tokens [T, B] int64, h [L, B, H] float32 (and c [L, B, H] for an LSTM)
    outputs  log_probs [T, B, V] float32, h_out [L, B, H] (and c_out [L, B, H])

with T and B free (dynamic axes), so a caller carries the state from chunk to chunk as training does. Any backend's
weights export: they share torch.nn's layout (DESIGN), so the model is rebuilt on torch.nn's layers, which ONNX's
LSTM, GRU and RNN operators take whole. The adaptive decoder is refused: its clusters pick their tokens with
data-dependent shapes, and fastlm has not made a static form of it.

Why torch's TorchScript exporter (``dynamo=False``) and not the torch.export one: in torch 2.13 the torch.export
exporter (which also needs onnxscript) writes the recurrent layers with a Reshape that keeps the sequence length
of the example input, so the file fails in onnxruntime on any other length; the TorchScript exporter maps torch.nn's
layers to ONNX's recurrent operators with both axes free. torch marks it deprecated; the test
(tests/test_onnx_export.py) runs every exported file in onnxruntime and will say when that changes.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.cells.math import CELL_MATH
from fastlm.errors import FastlmError, first_line
from fastlm.model import RNNLM
from fastlm.train.checkpoint import check_writable
from fastlm.train.verify import build_model, open_checkpoint

INSTALL = 'pip install -e ".[onnx]" (or pip install onnx onnxruntime)'
OPSET = 17  # onnxruntime 1.14 and later run it


def check_onnx_installed() -> None:
    """FastlmError saying how to install the exporter's checker when ``onnx`` is missing (said before training)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise FastlmError(f"ONNX export needs the onnx package, which is not installed; {INSTALL}") from None


def check_exportable(config) -> None:
    """FastlmError for a model configuration (ModelConfig) that has no ONNX form here: the adaptive decoder."""
    if config.decoder == "adaptive":
        raise FastlmError("--decoder adaptive cannot be exported to ONNX (its clusters pick their tokens with "
                          "data-dependent shapes); export a run with the full decoder")


class ChunkModel(nn.Module):
    """An RNNLM on torch.nn's recurrent layers, as the exported graph: tokens and state in, log-probabilities and
    state out (see the module doc). Evaluation mode: dropout is the identity."""

    def __init__(self, model: RNNLM):
        super().__init__()
        self.encoder, self.rnn, self.decoder = model.encoder, model.rnn, model.decoder
        self.has_cell_state = CELL_MATH[model.config.cell].has_cell_state

    def forward(self, tokens, h, c=None):
        output, state = self.rnn(self.encoder(tokens), (h, c) if self.has_cell_state else h)
        log_probs = F.log_softmax(self.decoder(output), dim=-1)
        return (log_probs, *state) if self.has_cell_state else (log_probs, state)


def export_model(model: RNNLM, path: str | Path) -> None:
    """Writes ``model`` (any backend, fp32 weights) to ``path`` as ONNX; the file appears whole or not at all."""
    check_onnx_installed()
    import onnx

    config = model.config
    check_exportable(config)
    torch_nn = RNNLM(model.ntoken, _on_torch_nn(config))
    torch_nn.load_state_dict({name: value.detach().float().cpu() for name, value in model.state_dict().items()})
    chunk = ChunkModel(torch_nn.eval())
    layers, hidden = config.nlayers, config.nhid
    # Two steps of two columns: no axis of the example is 1, which the exporter could mistake for a constant.
    example = (torch.zeros(2, 2, dtype=torch.long), *[torch.zeros(layers, 2, hidden)] * (1 + chunk.has_cell_state))
    state_names = ["h", "c"][:1 + chunk.has_cell_state]
    axes = {"tokens": {0: "seq", 1: "batch"}, "log_probs": {0: "seq", 1: "batch"},
            **{name: {1: "batch"} for name in state_names}, **{f"{name}_out": {1: "batch"} for name in state_names}}
    path = Path(path)
    # Written beside its place and renamed into it (created as any file is, with the umask's permissions).
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), torch.no_grad():
            # The choice of exporter is the module doc's (and so are its deprecation notices); torch's advice to
            # pass the initial state as an input (for other batch sizes) is what this graph does; the tracer's
            # warnings are about torch.nn's own shape checks, which the test's other shapes show hold.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
            warnings.filterwarnings("ignore", message=".*define the initial states.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(chunk, example, str(temporary), dynamo=False, opset_version=OPSET,
                              input_names=["tokens", *state_names],
                              output_names=["log_probs", *[f"{name}_out" for name in state_names]],
                              dynamic_axes=axes)
        onnx.checker.check_model(str(temporary))
        os.replace(temporary, path)
    except OSError as error:
        raise FastlmError(f"cannot write the ONNX file {path}: {error.strerror or error}") from None
    except Exception as error:  # the exporter's and checker's many error types: one line naming the file
        raise FastlmError(f"ONNX export to {path} failed: {first_line(error)}") from None
    finally:
        with contextlib.suppress(OSError):  # gone after the rename, or never made
            temporary.unlink(missing_ok=True)


def export_run(run_dir: str | Path, path: str | Path) -> Path:
    """The best model of the run in ``run_dir`` (its best.pt) written to ``path`` as ONNX; returns best.pt's path."""
    best = Path(run_dir) / "best.pt"
    if not best.is_file():
        raise FastlmError(f"{run_dir} has no best.pt (no epoch of it has finished its validation yet, or it is not "
                          f"a fastlm run folder): nothing to export")
    check_onnx_installed()
    check_writable(path, "--onnx")
    checked = open_checkpoint(best, torch.device("cpu"), copies=2)  # the one check of fastlm.train.verify
    export_model(build_model(checked, torch.device("cpu"), backend="cudnn"), path)
    return best


def _on_torch_nn(config):
    """The model configuration with torch.nn's recurrent layers (the cudnn backend) and no dropout."""
    return replace(config, backend="cudnn", variant="auto", dropout=0.0)
