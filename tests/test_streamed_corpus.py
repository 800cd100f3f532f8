"""Corpora bigger than memory (fastlm.data.data_modes): the streamed path gives the in-memory path's vocabulary,
ids and batches, keeps host memory flat as the corpus grows, is chosen by size, and names bad input."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.data import (
    SPLITS,
    Corpus,
    StreamedCorpus,
    data_modes,
    generated_corpus,
    load_corpus,
    load_data,
    resolve_corpus,
    split_files,
    text_stream,
)
from fastlm.data.synthetic import generated_texts
from fastlm.data.tokenize import EOS
from fastlm.errors import FastlmError
from tests.example_corpus import ALPHABET, TRICKY, assert_same_as_example, write_corpus


def assert_same_batches(memory, streamed, split: str, batch_size: int, bptt: int, start: int = 0, count=None,
                        columns=None):
    want = memory.batches(split, batch_size, bptt, "cpu", columns)
    got = streamed.batches(split, batch_size, bptt, "cpu", columns)
    assert len(got) == len(want) and got.rows == want.rows and got.column_count == want.column_count
    pairs = zip(got.iterate(start, count), want.iterate(start, count), strict=True)
    for number, ((i, x, y), (j, u, v)) in enumerate(pairs):
        assert i == j and x.dtype == u.dtype == torch.int64, (split, number)
        assert torch.equal(x, u) and torch.equal(y, v), (split, number)


def assert_same_corpus(memory: Corpus, streamed: StreamedCorpus):
    assert streamed.vocab == memory.vocab
    for split in SPLITS:
        ids = np.load(streamed.id_files[split], mmap_mode="r")
        assert streamed.token_counts[split] == len(ids) == len(getattr(memory, split))
        assert np.array_equal(ids, getattr(memory, split).numpy()), split


# ------------------------------------------------------------------ (a) the same vocabulary, ids and batches

def test_streamed_wikitext2_is_the_in_memory_corpus(wikitext2_dir, tmp_path):
    memory = load_corpus(wikitext2_dir, use_cache=False)
    streamed = load_data(wikitext2_dir, tmp_path, mode="stream")
    assert isinstance(streamed, StreamedCorpus) and len(streamed.vocab) == 33_278
    assert_same_corpus(memory, streamed)
    assert streamed.file_sha256 == {split: split_files.sha256_of(wikitext2_dir / f"{split}.txt") for split in SPLITS}
    assert_same_batches(memory, streamed, "train", 20, 35)  # the example's batch layout, every batch
    assert_same_batches(memory, streamed, "valid", 10, 35)
    assert_same_batches(memory, streamed, "test", 10, 35)
    assert_same_batches(memory, streamed, "train", 20, 35, start=2_980, count=9)  # resumed, going round


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
def test_streamed_tokens_match_the_example_on_tricky_text(tmp_path, text):
    folder = write_corpus(tmp_path / "data", text.encode(), valid="x\r\ny z".encode(), test="\u2028 q\n".encode())
    streamed = load_data(folder, tmp_path / "cache", mode="stream")
    assert_same_corpus(load_corpus(folder, use_cache=False), streamed)
    assert_same_as_example(load_corpus(folder, tmp_path / "cache"), folder)  # the memory path reads its entry


def example_tokens(path: Path) -> list[str]:
    """The example's tokens of one file: text-mode line iteration, split, <eos> per line."""
    with open(path, encoding="utf8") as f:
        return [word for line in f for word in line.split() + [EOS]]


def piece_tokens(path: Path) -> list[str]:
    return [word for piece in text_stream.text_pieces(path) for word in piece.replace("\n", f" {EOS} ").split()]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=60), block=st.integers(1, 9), carry=st.integers(1, 12))
def test_pieces_cut_anywhere_give_the_files_tokens(text, block, carry):
    """Blocks of a few bytes split characters, "\\r\\n" pairs and words; tiny carries cut long lines at spaces."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(text_stream, "TEXT_BLOCK_BYTES", block)
        patch.setattr(text_stream, "MAX_CARRY_CHARS", carry)
        path = Path(tmp) / "train.txt"
        path.write_bytes(text.encode("utf-8"))
        if text.strip():
            assert piece_tokens(path) == example_tokens(path)
        else:
            with pytest.raises(FastlmError, match="has only whitespace"):
                piece_tokens(path)


@pytest.fixture(scope="module")
def generated_folder(tmp_path_factory) -> Path:
    """The generated corpus's texts as a data folder (~0.5 MB)."""
    folder = tmp_path_factory.mktemp("generated")
    for split, text in generated_texts().items():
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


def test_streamed_generated_folder_is_the_in_memory_corpus(generated_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(text_stream, "TEXT_BLOCK_BYTES", 4096)  # many pieces, cut inside lines and characters
    memory = load_corpus(generated_folder, use_cache=False)
    streamed = load_data(generated_folder, tmp_path, mode="stream")
    assert_same_corpus(memory, streamed)
    for split, batch_size, bptt in (("train", 20, 35), ("train", 7, 13), ("valid", 10, 35), ("test", 3, 50)):
        assert_same_batches(memory, streamed, split, batch_size, bptt)
    assert_same_batches(memory, streamed, "train", 20, 35, start=100, count=300)  # past the end and round


def test_a_share_of_the_columns_is_that_share_of_the_batches(generated_folder, tmp_path):
    """Several processes each take a contiguous share of the batch's columns (fastlm.distributed)."""
    memory = load_corpus(generated_folder, use_cache=False)
    streamed = load_data(generated_folder, tmp_path, mode="stream")
    shares = [slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 20)]
    for share in shares:
        assert_same_batches(memory, streamed, "train", 20, 35, columns=share)
        assert_same_batches(memory, streamed, "valid", 10, 35, start=3, count=40, columns=slice(share.start // 2,
                                                                                                 share.stop // 2))
    whole = next(streamed.batches("train", 20, 35, "cpu").iterate(7, 1))[1]
    parts = [next(streamed.batches("train", 20, 35, "cpu", share).iterate(7, 1))[1] for share in shares]
    assert parts[0].shape == (35, 5) and torch.equal(torch.cat(parts, dim=1), whole)


def test_cache_entries_are_shared_by_both_paths(generated_folder, tmp_path):
    memory = load_data(generated_folder, tmp_path / "a", mode="memory")  # the in-memory path writes the entry
    assert_same_corpus(memory, load_data(generated_folder, tmp_path / "a", mode="stream"))
    streamed = load_data(generated_folder, tmp_path / "b", mode="stream")  # the streaming path writes it
    again = load_data(generated_folder, tmp_path / "b", mode="memory")
    assert_same_corpus(again, streamed)
    entries = [[entry.name for entry in (tmp_path / cache / "tokens").iterdir()] for cache in ("a", "b")]
    assert entries[0] == entries[1] and len(entries[0]) == 1  # one key, whichever path wrote it
    assert streamed.id_files == again.id_files


def test_short_eval_split_and_bad_sizes_behave_as_in_memory(tmp_path):
    folder = write_corpus(tmp_path / "data", b"a b c d e f g\n" * 50, valid=b"v w x y z\n" * 3, test=b"t\n")
    memory, streamed = load_corpus(folder, use_cache=False), load_data(folder, tmp_path / "cache", mode="stream")
    assert_same_batches(memory, streamed, "valid", 2, 35)  # 9 rows: one chunk of 8, shorter than bptt
    for split, batch_size, bptt in (("train", 5, 400), ("train", 500, 5), ("test", 3, 5)):
        with pytest.raises(FastlmError) as want:
            memory.batches(split, batch_size, bptt, "cpu")
        with pytest.raises(FastlmError) as got:
            streamed.batches(split, batch_size, bptt, "cpu")
        assert str(got.value) == str(want.value)  # names the flag to change, as before


def test_a_damaged_streamed_entry_is_rebuilt(generated_folder, tmp_path):
    first = load_data(generated_folder, tmp_path, mode="stream")
    path = first.id_files["valid"]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = load_data(generated_folder, tmp_path, mode="stream")
    assert rebuilt.token_counts == first.token_counts and rebuilt.vocab == first.vocab


# ------------------------------------------------------------------ (b) flat host memory

# Run in a fresh interpreter: a child forked from the test process would inherit its heap, whose free but
# resident pages absorb the in-memory path's allocations without raising the peak (measured in CI: 4 MiB of
# growth where a fresh process shows 125 MiB), and the test would measure the test process instead.
_CHILD = """
import sys
from pathlib import Path

from fastlm.data import load_data


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


folder, cache_dir, mode = sys.argv[1:]
try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
except OSError:
    pass
start = status_kib("VmRSS")
corpus = load_data(folder, cache_dir, mode)
for split, batch_size in (("train", 20), ("valid", 10), ("test", 10)):
    for _ in corpus.batches(split, batch_size, 35, "cpu").iterate():
        pass
print(status_kib("VmHWM") - start)
"""


def peak_growth_mib(folder: Path, cache_dir: Path, mode: str) -> float:
    """Peak resident memory (MiB) a fresh process gains tokenising ``folder`` into a fresh cache and reading every
    batch of every split, above what it held once its imports were done."""
    result = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(cache_dir), mode], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1]) / 1024


FLAT_MARGIN_MIB = 32  # streaming grows by ~0-15 MiB (page-cache folios mapped by the reads); memory by ~125 MiB


@pytest.fixture(scope="module")
def small_and_large_folders(tmp_path_factory) -> tuple[Path, Path]:
    """~2 MB of generated text, and the same text 8 times over (~16 MB, the same vocabulary)."""
    texts = generated_texts(sizes={"train": 330_000, "valid": 33_000, "test": 33_000})
    folders = []
    for name, copies in (("small", 1), ("large", 8)):
        folder = tmp_path_factory.mktemp(name)
        for split, text in texts.items():
            (folder / f"{split}.txt").write_text(text * copies, encoding="utf-8")
        folders.append(folder)
    return folders[0], folders[1]


@pytest.mark.perf
@pytest.mark.skipif(not Path("/proc/self/status").exists(),
                    reason="measures resident memory through Linux's /proc/self/status")
def test_streaming_keeps_host_memory_flat_as_the_corpus_grows(small_and_large_folders, tmp_path):
    small, large = small_and_large_folders
    assert split_files.text_bytes(split_files.split_paths(large)) > 14_000_000
    grown = {mode: [peak_growth_mib(folder, tmp_path / f"{mode}-{folder.name}", mode) for folder in (small, large)]
             for mode in ("stream", "memory")}
    print({mode: [f"{mib:.1f} MiB" for mib in sizes] for mode, sizes in grown.items()})
    (stream_small, stream_large), (memory_small, memory_large) = grown["stream"], grown["memory"]
    assert stream_large - stream_small < FLAT_MARGIN_MIB, grown
    # The margin means something: the in-memory path, holding the tokens and ids, clearly exceeds it.
    assert memory_large - memory_small > 2 * FLAT_MARGIN_MIB, grown


# ------------------------------------------------------------------ (c) the mode: chosen by size, or forced

def test_auto_streams_above_the_threshold_and_a_mode_can_be_forced(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "data", b"a b c\n" * 10, valid=b"v w\n", test=b"t\n")  # 60 + 4 + 2 bytes
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(data_modes, "STREAM_ABOVE_BYTES", 66)
    assert isinstance(load_data(folder, cache_dir), Corpus)  # at the threshold: memory
    assert isinstance(load_data(folder, cache_dir, "stream"), StreamedCorpus)
    monkeypatch.setattr(data_modes, "STREAM_ABOVE_BYTES", 65)
    assert isinstance(load_data(folder, cache_dir, "auto"), StreamedCorpus)  # above it: streamed
    assert isinstance(load_data(folder, cache_dir, "memory"), Corpus)
    assert load_data(folder, cache_dir, "memory").mode == "memory" and load_data(folder, cache_dir).mode == "stream"
    with pytest.raises(FastlmError, match="unknown data mode 'disk': choose one of auto, memory, stream"):
        load_data(folder, cache_dir, "disk")


def test_the_default_threshold_keeps_wikitext2_in_memory():
    assert data_modes.choose_mode("auto", 13_175_278) == "memory"  # Wikitext-2's three files
    assert data_modes.choose_mode("auto", 540_000_000) == "stream"  # Wikitext-103's
    assert data_modes.choose_mode("memory", 10**12) == "memory" and data_modes.choose_mode("stream", 1) == "stream"


def test_resolve_corpus_passes_the_mode_on(tmp_path):
    folder = write_corpus(tmp_path / "data", b"a b c\n" * 10)
    assert isinstance(resolve_corpus(str(folder), cache_dir=tmp_path / "c", mode="stream"), StreamedCorpus)
    assert isinstance(resolve_corpus(str(folder), cache_dir=tmp_path / "c"), Corpus)
    # The generated corpus has no files: asked to stream, it is written to the cache and streamed from there.
    streamed = resolve_corpus("generated", cache_dir=tmp_path / "c", mode="stream")
    memory = generated_corpus()
    assert isinstance(streamed, StreamedCorpus) and streamed.source == memory.source
    assert_same_corpus(memory, streamed)
    assert_same_batches(memory, streamed, "train", 20, 35)
    with pytest.raises(FastlmError, match="unknown data mode"):
        resolve_corpus("generated", cache_dir=tmp_path / "c", mode="mmap")


# ------------------------------------------------------------------ (d) bad input: one clear line

def both_errors(folder: Path, tmp_path: Path) -> str:
    """The error of the streamed path, checked to be one line and the same as the in-memory path's."""
    with pytest.raises(FastlmError) as streamed:
        load_data(folder, tmp_path / "cache", mode="stream")
    with pytest.raises(FastlmError) as memory:
        load_data(folder, tmp_path / "cache", mode="memory")
    message = str(streamed.value)
    assert "\n" not in message and message == str(memory.value)
    return message


def test_bad_folders_and_files_are_named(tmp_path, monkeypatch):
    assert "does not exist" in both_errors(tmp_path / "nowhere", tmp_path)
    folder = write_corpus(tmp_path / "missing", b"a\n")
    (folder / "valid.txt").unlink()
    assert "has no valid.txt: expected train.txt, valid.txt and test.txt" in both_errors(folder, tmp_path)
    assert "test.txt is empty" in both_errors(write_corpus(tmp_path / "empty", b"a\n", test=b""), tmp_path)
    blank = write_corpus(tmp_path / "blank", b"a\n", valid=b" \n\n\t\r\n")
    assert "valid.txt has only whitespace" in both_errors(blank, tmp_path)
    # A bad byte deep in the file, past many blocks, is placed at its offset in the file, not in a block.
    monkeypatch.setattr(text_stream, "TEXT_BLOCK_BYTES", 7)
    latin1 = write_corpus(tmp_path / "latin1", "word ".encode() * 40 + "caf\u00e9\n".encode("latin-1"))
    message = both_errors(latin1, tmp_path)
    assert "train.txt is not UTF-8" in message and "offset 203" in message and "0xe9" in message
    cut = write_corpus(tmp_path / "cut", "ok\n".encode(), valid="ab \u00e9".encode()[:-1])  # ends mid-character
    assert "valid.txt is not UTF-8 text: byte 0xc3 at offset 3" in both_errors(cut, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem")
def test_a_file_that_cannot_be_read_is_named(tmp_path):
    folder = write_corpus(tmp_path / "data", b"a\n")
    (folder / "train.txt").unlink()
    (folder / "train.txt").symlink_to("/proc/self/mem")  # a regular file whose first read fails (EIO)
    message = both_errors(folder, tmp_path)
    assert message.startswith(f"cannot read {folder / 'train.txt'} (") and "check its permissions" in message


def test_a_file_without_permission_is_named(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "data", b"a\n")

    def refuse(path, *args, **kwargs):  # what open() does on a chmod 000 file, even for root here
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(split_files, "open", refuse, raising=False)
    with pytest.raises(FastlmError, match=r"cannot read .*test.txt|cannot read .*train.txt") as info:
        load_data(folder, tmp_path / "cache", mode="stream")
    assert "(Permission denied): check its permissions" in str(info.value)


def test_streaming_without_a_writable_cache_says_what_to_do(tmp_path):
    folder = write_corpus(tmp_path / "data", b"a b\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(FastlmError, match="cannot write the token cache in .*FASTLM_CACHE_DIR.*--data-mode memory"):
        load_data(folder, blocked, mode="stream")
    with pytest.warns(UserWarning, match="cannot write the token cache"):
        assert isinstance(load_data(folder, blocked, mode="auto"), Corpus)  # a small corpus still loads, in memory
