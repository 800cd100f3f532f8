"""Tokenisation, vocabulary, token cache and data-folder errors (fastlm.data.corpus, fastlm.data.cache)."""

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.data import SPLITS, Vocabulary, cache, default_cache_dir, load_corpus, split_words
from fastlm.errors import FastlmError
from tests.example_corpus import ALPHABET, TRICKY, assert_same_as_example, example_corpus, write_corpus


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Nothing here may touch the user's real cache.
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
def test_tokens_match_the_example_on_tricky_text(tmp_path, text):
    # valid and test are tricky too (no final newline, a separator that is not a line break).
    folder = write_corpus(tmp_path / "data", text.encode(), valid="x\r\ny z".encode(), test="\u2028 q\n".encode())
    assert_same_as_example(load_corpus(folder, use_cache=False), folder)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_tokens_match_the_example_on_random_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_corpus(Path(tmp), text.encode("utf-8"))
        if not text.strip():
            with pytest.raises(FastlmError, match="needs at least one word"):
                load_corpus(folder, use_cache=False)
        else:
            assert_same_as_example(load_corpus(folder, use_cache=False), folder)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_parallel_tokeniser_gives_the_example_tokens(tmp_path, monkeypatch, workers):
    """The forked path (runs of lines cut across files, merged local vocabularies) on small files: the cuts
    fall inside train, at file boundaries and inside the tricky valid and test files."""
    import fastlm.data.tokenize as tokenize_module

    monkeypatch.setattr(tokenize_module, "PARALLEL_MIN_CHARS", 1)
    monkeypatch.setattr(tokenize_module.os, "cpu_count", lambda: workers)
    tricky = "".join(TRICKY.values())
    folder = write_corpus(tmp_path / "data", (tricky * 3).encode(), valid=("x\r\ny z\n" + tricky).encode(),
                          test=(tricky + "\u2028 q").encode())
    assert_same_as_example(load_corpus(folder, use_cache=False), folder)


def test_split_words_gives_every_line_an_eos():
    assert split_words("") == []
    assert split_words("a b\n\nc") == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]
    assert split_words("a\x0cb\u2028c\n") == ["a", "b", "c", "<eos>"]  # not line breaks in a file


def test_wikitext2_counts(wikitext2_dir, tmp_path):
    corpus = load_corpus(wikitext2_dir, tmp_path)
    assert len(corpus.vocab) == 33_278
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [2_088_628, 217_646, 245_569]
    assert corpus.train.dtype == torch.int64 and corpus.train.dim() == 1
    assert corpus.vocab.idx2word[0] == "<eos>"  # Wikitext-2 starts with a blank line


@pytest.fixture(scope="module")
def example_wikitext2(wikitext2_dir):
    """(seconds, (idx2word, splits)) of the example's own loop over Wikitext-2, run once for this file."""
    start = time.perf_counter()
    result = example_corpus(wikitext2_dir)
    return time.perf_counter() - start, result


def test_fast_tokeniser_gives_the_examples_corpus(wikitext2_dir, example_wikitext2):
    idx2word, splits = example_wikitext2[1]
    corpus = load_corpus(wikitext2_dir, use_cache=False)
    assert corpus.vocab.idx2word == idx2word
    assert all(torch.equal(getattr(corpus, split), splits[split]) for split in SPLITS)


@pytest.mark.perf
def test_fast_tokeniser_beats_the_example_loop(wikitext2_dir, example_wikitext2):
    example_s = example_wikitext2[0]
    fast_times = []
    for _ in range(3):
        start = time.perf_counter()
        load_corpus(wikitext2_dir, use_cache=False)
        fast_times.append(time.perf_counter() - start)
    fast_s = min(fast_times)  # the least disturbed run: this box is shared, and noise only ever adds time
    print(f"example loop {example_s:.2f} s, fast tokeniser {fast_s:.3f} s ({example_s / fast_s:.1f}x)")
    # On a quiet 2-core box the example takes 1.7-1.9 s and the fast path 0.45-0.49 s (3.7-3.9x): both are
    # bound by making one Python string per token; 2x is the floor that holds under heavy load from other work.
    assert example_s / fast_s >= 2, f"fast tokeniser {fast_s:.3f} s vs example {example_s:.3f} s"


def test_second_load_comes_from_the_cache(wikitext2_dir, tmp_path):
    first = load_corpus(wikitext2_dir, tmp_path)
    second = load_corpus(wikitext2_dir, tmp_path)
    assert second.vocab == first.vocab
    assert all(torch.equal(getattr(second, split), getattr(first, split)) for split in SPLITS)
    assert second.train.dtype == torch.int64
    # The .npy files are there for a memory-mapped reader, and hold the same ids.
    assert np.array_equal(np.load(second.id_files["valid"], mmap_mode="r"), first.valid.numpy())


@pytest.mark.perf
def test_a_cached_load_takes_under_a_second(wikitext2_dir, tmp_path):
    load_corpus(wikitext2_dir, tmp_path)
    start = time.perf_counter()
    load_corpus(wikitext2_dir, tmp_path)
    cached_s = time.perf_counter() - start
    print(f"cached load {cached_s:.3f} s")
    assert cached_s < 1.0


def test_cache_entry_is_complete_and_keyed_by_content(tmp_path):
    folder = write_corpus(tmp_path / "data", b"a b\nc\n")
    corpus = load_corpus(folder, tmp_path / "cache")
    entries = list((tmp_path / "cache" / "tokens").iterdir())
    assert [entry.name for entry in entries] == [cache.entry_key(corpus.file_sha256)]  # no staging leftovers
    assert sorted(p.name for p in entries[0].iterdir()) == ["test.npy", "train.npy", "valid.npy", "vocab.json"]
    (folder / "train.txt").write_bytes(b"a b\nd\n")  # new content, new key: never a stale hit
    changed = load_corpus(folder, tmp_path / "cache")
    assert "d" in changed.vocab.word2idx and "c" not in changed.vocab.word2idx


CORRUPTIONS = {
    "garbage npy": ("train.npy", b"not an array"),
    "truncated npy": ("valid.npy", None),
    "float ids": ("test.npy", "float"),
    "ids past the vocabulary": ("train.npy", "big"),
    "garbage vocab": ("vocab.json", b"{"),
    "vocab not words": ("vocab.json", b"[1, 2]"),
    "repeated words": ("vocab.json", b'["a", "a", "b", "c", "<eos>", "v", "w", "t"]'),
}


@pytest.mark.parametrize("name, damage", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_cache_entry_is_rebuilt(tmp_path, name, damage):
    folder = write_corpus(tmp_path / "data", b"a b\nc\n")
    good = load_corpus(folder, tmp_path / "cache")
    path = good.id_files["train"].parent / name
    if damage is None:
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "float":
        np.save(path, np.zeros(3))
    elif damage == "big":
        np.save(path, np.array([0, 1, 99], dtype=np.int64))
    else:
        path.write_bytes(damage)
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = load_corpus(folder, tmp_path / "cache")
    assert rebuilt.vocab == good.vocab
    assert all(torch.equal(getattr(rebuilt, split), getattr(good, split)) for split in SPLITS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry is whole again: no more warnings
        load_corpus(folder, tmp_path / "cache")


def test_unwritable_cache_warns_once_and_goes_on(tmp_path):
    folder = write_corpus(tmp_path / "data", b"a b\nc\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write the token cache"):
        corpus = load_corpus(folder, blocked)
    assert corpus.id_files == {} and corpus.vocab.idx2word[:3] == ["a", "b", "<eos>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(folder, blocked)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("FASTLM_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fastlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fastlm"


def test_default_cache_dir_is_used(tmp_path):
    load_corpus(write_corpus(tmp_path / "data", b"a\n"))
    assert (tmp_path / "default-cache" / "tokens").is_dir()


def test_vocabulary():
    vocab = Vocabulary.from_words(["<eos>", "a", "b"])
    assert len(vocab) == 3 and vocab.word2idx == {"<eos>": 0, "a": 1, "b": 2}
    assert vocab.digest() == Vocabulary.from_words(["<eos>", "a", "b"]).digest()
    assert vocab.digest() != Vocabulary.from_words(["<eos>", "b", "a"]).digest()  # order matters
    assert Vocabulary.from_words(["a b"]).digest() != Vocabulary.from_words(["a", "b"]).digest()
    assert Vocabulary.from_words(['a","b']).digest() != Vocabulary.from_words(["a", "b"]).digest()
    with pytest.raises(ValueError):
        Vocabulary.from_words(["a", "a"])


def error_of(folder) -> str:
    with pytest.raises(FastlmError) as info:
        load_corpus(folder, use_cache=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_name_the_problem_in_one_line(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in error_of(tmp_path / "file")
    folder = write_corpus(tmp_path / "data", b"a\n")
    (folder / "valid.txt").unlink()
    assert "has no valid.txt" in error_of(folder) and "train.txt, valid.txt and test.txt" in error_of(folder)
    folder = write_corpus(tmp_path / "empty", b"a\n", test=b"")
    assert "test.txt is empty" in error_of(folder)
    folder = write_corpus(tmp_path / "blank", b"a\n", valid=b" \n\n\t\r\n")
    assert "valid.txt has only whitespace" in error_of(folder)
    folder = write_corpus(tmp_path / "latin1", "caf\u00e9 ok\n".encode("latin-1"))
    message = error_of(folder)
    assert "train.txt is not UTF-8" in message and "offset 3" in message and "0xe9" in message
