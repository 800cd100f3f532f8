"""Streaming batches from a memory-mapped token-id file: the example's batches, with flat host memory."""

import shutil

import numpy as np
import pytest
import torch

from fastlm.data.batching import BatchStreamer, batchify
from fastlm.data.stream import TokenFileStream
from fastlm.errors import FastlmError


def write_ids(path, ids: np.ndarray) -> None:
    np.save(path, ids)


def pattern(start: int, stop: int, vocab: int) -> np.ndarray:
    """The ids of positions start..stop-1 of the test corpora: cheap to recompute anywhere."""
    return ((np.arange(start, stop, dtype=np.int64) * 7919 + 13) % vocab).astype(np.int32)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("start_batch", [0, 5])
def test_batches_are_batchify_s(tmp_path, dtype, start_batch):
    ids = pattern(0, 10_007, 97).astype(dtype)
    write_ids(tmp_path / "train.npy", ids)
    stream = TokenFileStream(tmp_path / "train.npy", batch_size=7, bptt=13, device="cpu", vocab_size=97)
    reference = BatchStreamer(batchify(torch.from_numpy(ids.astype(np.int64)), 7), 13, "cpu")
    assert len(stream) == len(reference)
    got, want = list(stream.iterate(start_batch)), list(reference.iterate(start_batch))
    assert len(got) == len(want) and got[-1][1].shape[0] < 13  # the last chunk is the short one
    for (i, x, y), (j, u, v) in zip(got, want, strict=True):
        assert i == j and x.dtype == torch.int64 and torch.equal(x, u) and torch.equal(y, v)
    stream.close()


def test_bad_files_and_sizes_are_named(tmp_path):
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(FastlmError, match="not a .npy"):
        TokenFileStream(tmp_path / "text.npy", 4, 5, "cpu")
    np.save(tmp_path / "floats.npy", np.zeros(100, dtype=np.float32))
    with pytest.raises(FastlmError, match="integer"):
        TokenFileStream(tmp_path / "floats.npy", 4, 5, "cpu")
    np.save(tmp_path / "short.npy", np.arange(10))
    with pytest.raises(FastlmError, match="batch size"):
        TokenFileStream(tmp_path / "short.npy", 8, 5, "cpu")
    with pytest.raises(FastlmError, match="--bptt"):
        TokenFileStream(tmp_path / "short.npy", 2, 5, "cpu")
    np.save(tmp_path / "big_ids.npy", np.arange(100))
    stream = TokenFileStream(tmp_path / "big_ids.npy", 2, 5, "cpu", vocab_size=50)
    with pytest.raises(FastlmError, match="outside the vocabulary"):
        list(stream.iterate())


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


TOKENS = 100_000_000 + 20  # a Wikitext-103-sized corpus (103M tokens), as int32: ~400 MB


@pytest.mark.perf
@pytest.mark.slow
def test_a_corpus_of_100m_tokens_streams_in_flat_memory(tmp_path):
    if shutil.disk_usage(tmp_path).free < 2 * TOKENS * 4:
        pytest.skip(f"needs {2 * TOKENS * 4 / 2**30:.1f} GiB free in {tmp_path}")
    path = tmp_path / "train.npy"
    vocab = 267_735
    with open(path, "wb") as f:  # written piece by piece: the test's own memory must stay small too
        np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": (TOKENS,)})
        for start in range(0, TOKENS, 10_000_000):
            pattern(start, min(start + 10_000_000, TOKENS), vocab).tofile(f)
    try:
        batch_size, bptt = 20, 2_000  # long chunks so that the test reads the whole file in seconds
        stream = TokenFileStream(path, batch_size, bptt, "cpu", vocab_size=vocab)
        rows = TOKENS // batch_size
        before, peak, seen = rss_kb(), 0, 0
        for index, inputs, targets in stream.iterate():
            seen += targets.numel()
            if index % 100 == 0 or index == len(stream) - 1:
                peak = max(peak, rss_kb() - before)
                start = stream.starts[index]
                column = 13  # spot-check one column against the file's pattern
                want = pattern(column * rows + start, column * rows + start + inputs.shape[0] + 1, vocab)
                assert np.array_equal(inputs[:, column].numpy(), want[:-1])
                assert np.array_equal(targets.view(-1, batch_size)[:, column].numpy(), want[1:])
        assert seen == (rows - 1) * batch_size  # every token of every column but the first was a target
        stream.close()
        assert peak < 64 * 1024, f"resident memory grew by {peak / 1024:.0f} MB while streaming {TOKENS * 4 >> 20} MB"
    finally:
        path.unlink()


@pytest.mark.gpu
def test_batches_reach_the_gpu_through_the_side_stream(tmp_path):
    ids = pattern(0, 5_003, 50)
    np.save(tmp_path / "train.npy", ids)
    stream = TokenFileStream(tmp_path / "train.npy", 5, 9, "cuda", vocab_size=50)
    reference = BatchStreamer(batchify(torch.from_numpy(ids.astype(np.int64)), 5), 9, "cuda")
    for (i, x, y), (j, u, v) in zip(stream.iterate(), reference.iterate(), strict=True):
        assert x.is_cuda and i == j and torch.equal(x, u) and torch.equal(y, v)
        x.add_(1)  # the consumer may write its batch: later batches must not see it
