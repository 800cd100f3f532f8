"""Test-session setup shared by every test file.

TRITON_INTERPRET must be set before triton kernels are first imported, so it is set here, at collection,
when no CUDA device is present: the Triton kernels then run on CPU tensors through the interpreter.
FASTLM_LOSS_TUNE=0 keeps the fused loss on its heuristic chunk sizes (see below).
"""

import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The fused loss's chunk sizes: the fixed heuristic, so that results do not depend on timings taken while the
# suite runs (tests/test_loss_chunks.py turns tuning on where it is what is tested).
os.environ.setdefault("FASTLM_LOSS_TUNE", "0")


@pytest.fixture(scope="session")
def _session_token_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(autouse=True)
def _private_token_cache(_session_token_cache, monkeypatch):
    """Every test, and every process it starts, keeps its token cache in a temporary folder of this test
    session (shared across its tests, so Wikitext-2 is tokenised once), never in the user's ~/.cache."""
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(_session_token_cache))


@pytest.fixture(autouse=True)
def _exact_fp32_on_gpu():
    """For every test: cuDNN RNNs use TF32 for fp32 by default on Ampere+; parity at 1e-5 needs true fp32."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def wikitext2_dir() -> Path:
    """The Wikitext-2 folder named by FASTLM_WIKITEXT2 (set by .ci/run), or a skip saying it is absent."""
    folder = os.environ.get("FASTLM_WIKITEXT2")
    if not folder or not (Path(folder) / "train.txt").is_file():
        pytest.skip("Wikitext-2 not found: set FASTLM_WIKITEXT2 to the folder with train/valid/test.txt")
    return Path(folder)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A --data folder of the toy corpus (tests.helpers.toy_corpus), written once per test module."""
    from tests.helpers import toy_corpus, write_corpus_folder  # here: this file sets the environment first

    return write_corpus_folder(toy_corpus(), tmp_path_factory.mktemp("toy"))
