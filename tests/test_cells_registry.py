"""The registry offers the fused backends honestly: what they cover, how they say why not, what they tell
the user (variant, interpretation), and what they keep quiet (TorchScript's deprecation warning)."""

import os
import subprocess
import sys

import pytest
import torch

from fastlm import cells
from fastlm.errors import FastlmError


def python(code: str, **env_changes) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (import-time behaviour cannot be tested in this one)."""
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_backends_and_their_cells():
    assert {"reference", "cudnn", "script", "triton", "compile"} <= set(cells.BACKENDS)
    for cell in cells.CELLS:
        assert cells.unavailable_reason(cell, "script") is None
    assert "has no rnn_tanh cell" in cells.unavailable_reason("rnn_tanh", "triton")
    assert "has no rnn_relu cell" in cells.unavailable_reason("rnn_relu", "compile")


# Pure PyTorch: these run wherever fastlm installs. A machine's runner adds what it must also have
# (.ci/run: triton through the interpreter and compile; bench/gpu_check.sh: the compiled ones).
ALWAYS_REQUIRED = ("reference", "cudnn", "script")


def test_backends_this_machine_must_have_are_available():
    """Tests parametrised from the registry skip a backend that cannot run; this keeps such a skip from
    hiding a broken install (triton failing to import, no C++ compiler) on a machine that must have it."""
    extra = [b for b in os.environ.get("FASTLM_REQUIRED_BACKENDS", "").split(",") if b]
    missing = {backend: cells.unavailable_reason(cell, backend) for backend in (*ALWAYS_REQUIRED, *extra)
               for cell in ("lstm", "gru") if cells.unavailable_reason(cell, backend) is not None}
    assert not missing, f"backends this machine must run are unavailable: {missing}"


def test_unavailable_pair_raises_with_alternatives():
    with pytest.raises(FastlmError, match=r"cannot build rnn_tanh/triton: .*available here: .*lstm/reference"):
        cells.build(cell="rnn_tanh", backend="triton", input_size=3, hidden_size=4)


def test_importing_cells_does_not_import_triton():
    """Importing fastlm.cells stays free of triton; probing backends never imports the kernels (the
    compile probe imports torch._dynamo, which may import triton itself)."""
    done = python("import sys, fastlm.cells as c; print('triton' in sys.modules); c.available(); "
                  "print([m for m in sys.modules if m.startswith('fastlm.kernels.')])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False", "[]"]


def test_script_backend_hides_the_torchscript_deprecation_warning():
    done = python("import torch; from fastlm import cells\n"
                  "for cell in cells.CELLS:\n"
                  "    m = cells.build(cell=cell, backend='script', input_size=3, hidden_size=4, num_layers=2)\n"
                  "    y, _ = m(torch.randn(2, 3, 3)); y.sum().backward()\n"
                  "import warnings; warnings.warn('still shown', DeprecationWarning)\n")
    assert done.returncode == 0, done.stderr
    assert "torch.jit" not in done.stderr and "still shown" in done.stderr, done.stderr


def _need_triton():
    reason = cells.unavailable_reason("lstm", "triton")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback to the Triton interpreter")
def test_triton_without_cuda_turns_on_the_interpreter_and_says_so():
    _need_triton()
    done = python("import os, torch; from fastlm import cells\n"
                  "cells.available()\n"  # the compile probe imports torch._dynamo, which imports triton
                  "m = cells.build(cell='lstm', backend='triton', input_size=3, hidden_size=4)\n"
                  "cells.build(cell='gru', backend='triton', input_size=3, hidden_size=4)\n"
                  "y, _ = m(torch.randn(2, 3, 3)); y.sum().backward()\n"
                  "print(os.environ['TRITON_INTERPRET'], m.variant, m.interpreted); print(m.describe())",
                  TRITON_INTERPRET=None)
    assert done.returncode == 0, done.stderr
    first, description = done.stdout.splitlines()
    assert first == "1 per-step True"
    assert "Triton interpreter" in description and "per-step" in description
    assert done.stderr.count("Triton interpreter") == 1, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback to the Triton interpreter")
def test_triton_imported_too_early_gives_a_clear_error():
    _need_triton()
    done = python("import triton; from fastlm import cells\n"
                  "from fastlm.errors import FastlmError\n"
                  "try:\n"
                  "    cells.build(cell='lstm', backend='triton', input_size=3, hidden_size=4)\n"
                  "except FastlmError as error:\n"
                  "    print(error)\n", TRITON_INTERPRET=None)
    assert done.returncode == 0, done.stderr
    assert "triton was imported before TRITON_INTERPRET=1 was set" in done.stdout, done.stdout


def test_triton_rejects_mismatched_or_unsupported_tensors():
    _need_triton()
    layer = cells.build(cell="gru", backend="triton", input_size=3, hidden_size=4)
    with pytest.raises(FastlmError, match="must match the parameters' device and dtype"):
        layer(torch.randn(2, 3, 3, dtype=torch.float64))
    with pytest.raises(FastlmError, match="must match the parameters' device and dtype"):
        layer(torch.randn(2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.float16))
    with pytest.raises(FastlmError, match="dtype torch.float64 is not supported"):
        layer.double()(torch.randn(2, 3, 3, dtype=torch.float64))
    if not layer.interpreted:
        with pytest.raises(FastlmError, match="compiled for CUDA"):
            layer.float().cpu()(torch.randn(2, 3, 3))


def test_triton_describes_its_variant():
    _need_triton()
    layer = cells.build(cell="lstm", backend="triton", input_size=3, hidden_size=4, variant="per-step")
    assert layer.variant == "per-step"
    assert "1 fused kernel per time step" in layer.describe()
    assert ("interpreter" in layer.describe()) == layer.interpreted
