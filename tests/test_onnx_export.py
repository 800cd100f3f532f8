"""The ONNX export, run by onnxruntime: its log-probabilities and final state are fastlm's, for every cell, tied
or not, any backend's weights, two batch sizes and two lengths (dynamic axes), from a carried (non-zero) state.

Tolerance rule: the fp32 parity rule (tests/tolerances.py), per compared tensor:
max|onnx - fastlm| <= 1e-5 * max|fastlm|. onnxruntime runs the same fp32 math with kernels of its own (its GEMMs,
its recurrent loop, its log-softmax), so the two differ by rounding in another order: at most 3.2e-7 of the largest
magnitude over these shapes (measured), where a wrong gate order, weight or state wiring is off by 1e-2 to 1.
"""

import os
import sys

import pytest
import torch

from fastlm.config import ModelConfig
from fastlm.errors import FastlmError
from fastlm.model import RNNLM
from fastlm.train.onnx_export import export_model
from tests.helpers import one_line_error, run_cli
from tests.tolerances import FP32_RTOL

onnxruntime = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")

VOCAB, LAYERS, HIDDEN = 50, 2, 12
SHAPES = [(3, 1), (3, 5), (17, 1), (17, 5)]  # (T, B): two lengths by two batch sizes


def fastlm_chunk(model, tokens, state):
    """What fastlm computes for a chunk: log-probabilities [T, B, V] and the final state."""
    with torch.no_grad():
        hidden, state = model(tokens, state)
        log_probs = torch.log_softmax(model.decode(hidden), dim=-1).view(*tokens.shape, -1)
    return [log_probs, *(state if isinstance(state, tuple) else (state,))]


def assert_within_rule(got, expected, name):
    error = (torch.from_numpy(got) - expected).abs().max().item()
    assert error <= FP32_RTOL * expected.abs().max().item(), f"{name}: max error {error:.2e}"


@pytest.mark.parametrize("cell, tied, backend", [
    ("lstm", False, "cudnn"), ("lstm", True, "reference"), ("gru", False, "script"), ("gru", True, "cudnn"),
    ("rnn_tanh", False, "cudnn"), ("rnn_relu", True, "cudnn"),
])
def test_onnxruntime_computes_fastlms_log_probs_and_state(cell, tied, backend, tmp_path):
    torch.manual_seed(0)
    model = RNNLM(VOCAB, ModelConfig(cell=cell, backend=backend, emsize=HIDDEN, nhid=HIDDEN, nlayers=LAYERS,
                                     dropout=0.3, tied=tied)).eval()
    with torch.no_grad():  # non-zero biases, so a dropped or misplaced bias shows
        for name, p in model.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    path = tmp_path / "model.onnx"
    export_model(model, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["tokens", "h", "c"] if cell == "lstm" else names == ["tokens", "h"]
    generator = torch.Generator().manual_seed(1)
    for steps, batch in SHAPES:
        tokens = torch.randint(VOCAB, (steps, batch), generator=generator)
        state = [torch.randn(LAYERS, batch, HIDDEN, generator=generator) for _ in names[1:]]
        expected = fastlm_chunk(model, tokens, tuple(state) if cell == "lstm" else state[0])
        got = session.run(None, {name: value.numpy() for name, value in zip(names, [tokens, *state], strict=True)})
        assert got[0].shape == (steps, batch, VOCAB)
        for output, value, reference in zip(["log_probs", "h_out", "c_out"], got, expected):
            assert_within_rule(value, reference, f"{output} at T={steps}, B={batch}")


def test_the_adaptive_decoder_is_refused_in_one_line(tmp_path):
    model = RNNLM(VOCAB, ModelConfig(emsize=32, nhid=32, decoder="adaptive", cutoffs=[10, 30]))
    with pytest.raises(FastlmError, match="adaptive cannot be exported"):
        export_model(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_to_export_an_adaptive_decoder_before_training(tmp_path):
    status, _, err = run_cli("train", "--data", "generated", "--dry-run", "--decoder", "adaptive", "--run-dir",
                             tmp_path / "run", "--onnx-export", tmp_path / "model.onnx")
    assert "adaptive cannot be exported" in one_line_error(status, err)
    assert not (tmp_path / "run").exists()


def test_train_then_export_round_trip_through_the_command_line(tmp_path):
    """`fastlm train --onnx-export` and `fastlm export RUN_DIR --onnx` write the same model: the run's best."""
    run, trained, exported = tmp_path / "run", tmp_path / "trained.onnx", tmp_path / "exported.onnx"
    status, _, err = run_cli("train", "--data", "generated", "--dry-run", "--emsize", "16", "--nhid", "16",
                             "--cell", "gru", "--run-dir", run, "--onnx-export", trained)
    assert status == 0, err
    status, out, err = run_cli("export", run, "--onnx", exported)
    assert status == 0 and "exported" in out, err
    assert trained.read_bytes() == exported.read_bytes()
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    log_probs, h_out = session.run(None, {"tokens": torch.zeros(4, 2, dtype=torch.long).numpy(),
                                          "h": torch.zeros(2, 2, 16).numpy()})
    assert log_probs.shape[:2] == (4, 2) and h_out.shape == (2, 2, 16)


def test_export_of_a_folder_without_a_best_model_is_one_line(tmp_path):
    status, _, err = run_cli("export", tmp_path, "--onnx", tmp_path / "model.onnx")
    assert "has no best.pt" in one_line_error(status, err)
    assert not (tmp_path / "model.onnx").exists()


def test_without_onnx_installed_the_commands_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    status, _, err = run_cli("train", "--data", "generated", "--dry-run", "--run-dir", tmp_path / "run",
                             "--onnx-export", tmp_path / "model.onnx")
    assert 'pip install -e ".[onnx]"' in one_line_error(status, err)
    assert not (tmp_path / "run").exists()  # refused before training, not after it


def test_an_unwritable_path_is_one_line_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    model = RNNLM(VOCAB, ModelConfig(emsize=HIDDEN, nhid=HIDDEN))
    with pytest.raises(FastlmError, match="cannot write the ONNX file"):
        export_model(model, tmp_path / "a-file" / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_the_exported_file_has_the_umasks_permissions(tmp_path):
    export_model(RNNLM(VOCAB, ModelConfig(emsize=HIDDEN, nhid=HIDDEN)), tmp_path / "model.onnx")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
