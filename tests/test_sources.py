"""Resolving a data spec into a corpus (fastlm.data.sources) and the generated corpus (fastlm.data.synthetic)."""

import io

import pytest
import torch
from rich.console import Console

from fastlm.data import SPLITS, generated_corpus, resolve_corpus
from fastlm.errors import FastlmError
from test_download import closed_port_url, fake_files, serving, write_fake_files


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # Neither the user's cache nor the test session's Wikitext-2 variable may leak into these tests.
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.delenv("FASTLM_WIKITEXT2", raising=False)
    monkeypatch.delenv("FASTLM_WIKITEXT2_URL", raising=False)


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400, force_terminal=False), out


def one_line_error(**kwargs) -> str:
    with pytest.raises(FastlmError) as info:
        resolve_corpus(**kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_wikitext2_from_the_environment(wikitext2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_WIKITEXT2", str(wikitext2_dir))
    con, out = console()
    corpus = resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache", console=con)
    assert len(corpus.vocab) == 33_278 and len(corpus.valid) == 217_646
    assert "FASTLM_WIKITEXT2" in corpus.source and "differ" not in corpus.source
    assert out.getvalue() == ""


def test_environment_folder_with_other_files_is_used_with_a_warning(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    write_fake_files(folder)  # the real sums stay: these files are not Wikitext-2
    monkeypatch.setenv("FASTLM_WIKITEXT2", str(folder))
    con, out = console()
    corpus = resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache", console=con)
    assert "differ" in corpus.source and "differ from Wikitext-2" in out.getvalue()
    assert "line" in corpus.vocab.word2idx


def test_bad_environment_folder_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_WIKITEXT2", str(tmp_path / "nowhere"))
    message = one_line_error(spec="wikitext-2", cache_dir=tmp_path)
    assert "FASTLM_WIKITEXT2" in message and "nowhere" in message


def test_path_spec(tmp_path):
    folder = tmp_path / "data"
    write_fake_files(folder)
    corpus = resolve_corpus(str(folder), cache_dir=tmp_path / "cache")
    assert corpus.source == f"folder {folder}" and len(corpus.train) == 7


def test_missing_path_spec_says_what_is_expected(tmp_path):
    message = one_line_error(spec=str(tmp_path / "nowhere"), cache_dir=tmp_path)
    assert "nowhere" in message and "wikitext-2" in message and "train.txt" in message


def test_generated_spec_says_so(tmp_path):
    con, out = console()
    corpus = resolve_corpus("generated", cache_dir=tmp_path, console=con)
    assert "generated" in corpus.source and "generated" in out.getvalue()


def test_generated_corpus_is_deterministic_and_sized():
    corpus, again = generated_corpus(), generated_corpus()
    assert corpus.vocab == again.vocab
    assert all(torch.equal(getattr(corpus, split), getattr(again, split)) for split in SPLITS)
    assert 300 <= len(corpus.vocab) <= 500
    assert 80_000 <= len(corpus.train) < 81_000
    assert 8_000 <= len(corpus.valid) < 9_000 and 8_000 <= len(corpus.test) < 9_000
    # Pinned, so that a change to the grammar or to random's streams is noticed: update it on purpose only.
    assert corpus.vocab.digest() == "5cb6dc1b92fbc547c7312848cecbb755279f46ffb457540321b4c9cb7f533f88"
    assert generated_corpus(seed=7).vocab != corpus.vocab


def test_offline_falls_back_to_generated_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_WIKITEXT2_URL", closed_port_url())
    con, out = console()
    corpus = resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache", console=con)
    assert corpus.vocab == generated_corpus().vocab
    assert "fallback" in corpus.source
    warning = " ".join(out.getvalue().split())
    for needed in ("WARNING", "could not download", "FASTLM_WIKITEXT2 ", "FASTLM_WIKITEXT2_URL", "--data PATH"):
        assert needed in warning


def test_download_turned_off_falls_back_without_the_network(tmp_path):
    con, out = console()
    corpus = resolve_corpus("wikitext-2", cache_dir=tmp_path, console=con, allow_download=False)
    assert "fallback" in corpus.source and "downloading is turned off" in out.getvalue()


def test_download_lands_in_the_cache_and_is_reused_offline(tmp_path, monkeypatch):
    contents = fake_files(tmp_path / "served", monkeypatch)  # patched sums: these count as Wikitext-2 here
    with serving(tmp_path / "served") as url:
        monkeypatch.setenv("FASTLM_WIKITEXT2_URL", url)
        first = resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache", console=console()[0])
    assert "downloaded" in first.source
    assert (tmp_path / "cache" / "wikitext-2" / "train.txt").read_bytes() == contents["train.txt"]
    monkeypatch.setenv("FASTLM_WIKITEXT2_URL", closed_port_url())  # the server is gone
    second = resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache", console=console()[0])
    assert second.source == f"Wikitext-2 from {tmp_path / 'cache' / 'wikitext-2'}"
    assert second.vocab == first.vocab and torch.equal(second.train, first.train)


def test_damaged_cached_copy_is_downloaded_again(tmp_path, monkeypatch):
    contents = fake_files(tmp_path / "served", monkeypatch)
    cached = tmp_path / "cache" / "wikitext-2"
    cached.mkdir(parents=True)
    for name, data in contents.items():
        (cached / name).write_bytes(data)
    (cached / "test.txt").write_bytes(b"altered\n")
    with serving(tmp_path / "served") as url:
        monkeypatch.setenv("FASTLM_WIKITEXT2_URL", url)
        corpus = resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache", console=console()[0])
    assert "downloaded" in corpus.source and (cached / "test.txt").read_bytes() == contents["test.txt"]
