"""Where a corpus comes from: a data spec ("wikitext-2", "generated" or a folder), held in memory or streamed.

``resolve_corpus(spec, mode=...)`` gives a Corpus (fastlm.data.corpus) or a StreamedCorpus (fastlm.data.stream).
"wikitext-2" looks, in order, at $FASTLM_WIKITEXT2, at the copy in the cache folder, and at the network; when
all fail the run still goes on, on the generated corpus, after a loud warning saying how to get Wikitext-2,
so that an offline machine can still train, test and profile. ``load_data(folder, cache_dir, mode)`` reads a
folder as ``mode`` (of DATA_MODES) says: "memory" (read whole, tokenised on all cores), "stream" (tokenised in
bounded pieces into the token cache, read through a memory map) or "auto" ("stream" above STREAM_ABOVE_BYTES
of text). Both give the same vocabulary, ids and batches: the mode changes memory use and speed, never a number.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from fastlm.config import DATA_MODES
from fastlm.data import cache
from fastlm.data.corpus import Corpus, load_corpus
from fastlm.data.download import URL_ENV, WIKITEXT2_SHA256, DownloadError, download_wikitext2, wikitext2_url
from fastlm.data.split_files import split_paths, text_bytes
from fastlm.data.stream import StreamedCorpus, stream_folder, stream_in_memory
from fastlm.data.synthetic import generated_corpus
from fastlm.errors import FastlmError

WIKITEXT2 = "wikitext-2"
GENERATED = "generated"
WIKITEXT2_ENV = "FASTLM_WIKITEXT2"
# In memory, tokenising holds every token as a Python string for a moment: ~17 bytes of memory per byte of
# text at the peak, the main process and its forked workers together, and the ids take 8 bytes a token after.
# Streamed, memory stays flat, but a batch costs a strided copy out of the map (and on CUDA one more copy into
# pinned memory) and tokenising uses one core (measured: docs/streamed-data.md). 128 MiB of text (~2 GiB at
# that peak) keeps Wikitext-2 (13 MB) in memory and streams Wikitext-103 (540 MB).
STREAM_ABOVE_BYTES = 128 << 20


def resolve_corpus(spec: str, cache_dir=None, console: Console | None = None, allow_download: bool = True,
                   mode: str = "auto") -> Corpus | StreamedCorpus:
    """The corpus named by ``spec``: "wikitext-2", "generated", or a folder with train/valid/test.txt.

    The two names win over folders of the same name; write ./generated for such a folder. ``cache_dir``
    defaults to cache.default_cache_dir(); notices and warnings go to ``console`` (default: stderr).
    ``mode`` ("auto", "memory" or "stream"; load_data) says whether the ids are held in memory
    or streamed from the token cache; the generated corpus streams only when asked to.
    """
    check_mode(mode)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    console = console or Console(stderr=True)
    load = functools.partial(load_data, cache_dir=cache_dir, mode=mode)
    if spec == WIKITEXT2:
        corpus = _wikitext2(cache_dir, console, allow_download, load)
    elif spec == GENERATED:
        console.print("[bold]fastlm:[/] using the generated toy corpus (not Wikitext-2) as asked")
        corpus = generated_corpus()
    elif not Path(spec).expanduser().is_dir():
        raise FastlmError(
            f"no data folder {spec}: give '{WIKITEXT2}', '{GENERATED}' "
            "or a folder with train.txt, valid.txt and test.txt"
        )
    else:
        corpus = load(spec)
    # A corpus made in memory (the generated one, the fallback) streams only when asked: it is small.
    return stream_in_memory(corpus, cache_dir) if mode == "stream" and isinstance(corpus, Corpus) else corpus


def choose_mode(mode: str, total_bytes: int) -> str:
    """The mode, "memory" or "stream", for a corpus of ``total_bytes`` of text under ``mode`` (of DATA_MODES)."""
    check_mode(mode)
    if mode != "auto":
        return mode
    return "stream" if total_bytes > STREAM_ABOVE_BYTES else "memory"


def check_mode(mode: str) -> None:
    if mode not in DATA_MODES:
        raise FastlmError(f"unknown data mode {mode!r}: choose one of {', '.join(DATA_MODES)}")


def load_data(folder, cache_dir=None, mode: str = "auto") -> Corpus | StreamedCorpus:
    """The corpus in ``folder``/{train,valid,test}.txt, in memory or streamed as ``mode`` says (see the module doc).

    ``cache_dir`` defaults to cache.default_cache_dir(); streaming needs it to be writable.
    """
    folder = Path(folder).expanduser()
    paths = split_paths(folder)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    if choose_mode(mode, text_bytes(paths)) == "memory":
        return load_corpus(folder, cache_dir)
    return stream_folder(paths, cache_dir, source=f"folder {folder}")


def _wikitext2(cache_dir: Path, console: Console, allow_download: bool, load) -> Corpus | StreamedCorpus:
    if os.environ.get(WIKITEXT2_ENV):
        return _from_env(os.environ[WIKITEXT2_ENV], load, console)
    folder = cache_dir / WIKITEXT2
    corpus = _cached_copy(folder, load)
    if corpus is not None:
        return corpus
    if not allow_download:
        return _fallback("downloading is turned off", console)
    try:
        return _download_and_load(folder, console, load)
    except DownloadError as error:
        return _fallback(str(error), console)


def _cached_copy(folder: Path, load) -> Corpus | StreamedCorpus | None:
    """The Wikitext-2 downloaded earlier into ``folder``, or None if it is absent, incomplete or altered."""
    try:
        corpus = load(folder)
    except FastlmError:
        return None  # a missing, empty or damaged file: downloading again repairs it
    # load_corpus hashed the files anyway, so checking them against Wikitext-2's sums costs nothing.
    if corpus.file_sha256 != _wikitext2_sha256():
        return None
    corpus.source = f"Wikitext-2 from {folder}"
    return corpus


def _wikitext2_sha256() -> dict[str, str]:
    """Wikitext-2's sums keyed by split, as Corpus.file_sha256 has them."""
    return {name.removesuffix(".txt"): digest for name, digest in WIKITEXT2_SHA256.items()}


def _from_env(value: str, load, console: Console) -> Corpus | StreamedCorpus:
    try:
        corpus = load(value)
    except FastlmError as error:
        raise FastlmError(f"{WIKITEXT2_ENV}={value} is not usable: {error}") from None
    corpus.source = f"Wikitext-2 from {WIKITEXT2_ENV}={value}"
    if corpus.file_sha256 != _wikitext2_sha256():
        # Someone's own variant is allowed (it is their explicit choice), but results will not be comparable.
        console.print(f"[yellow]fastlm: warning:[/] the files in {WIKITEXT2_ENV}={value} differ from Wikitext-2's")
        corpus.source += " (files differ from the published Wikitext-2)"
    return corpus


def _download_and_load(folder: Path, console: Console, load) -> Corpus | StreamedCorpus:
    console.print(f"fastlm: downloading Wikitext-2 from {wikitext2_url()} into {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        # A read-only cache must not stop the run: fetch into a temporary folder and keep only the tokens.
        console.print(
            f"[yellow]fastlm: warning:[/] cannot write {folder}; Wikitext-2 will be downloaded again next time"
        )
        with tempfile.TemporaryDirectory(prefix="fastlm-wikitext-2-") as tmp:
            corpus = load(download_wikitext2(tmp, console=console))
        corpus.source = "Wikitext-2 (downloaded, not kept)"
        return corpus
    corpus = load(download_wikitext2(folder, console=console))
    corpus.source = f"Wikitext-2 from {folder} (downloaded)"
    return corpus


def _fallback(reason: str, console: Console) -> Corpus:
    console.print(
        Panel(
            f"Wikitext-2 is not available: {reason}.\n"
            "Training on the GENERATED TOY CORPUS instead; its losses and perplexities are NOT comparable "
            "with Wikitext-2 results.\n"
            "To use Wikitext-2, do one of:\n"
            f"  - set {WIKITEXT2_ENV} to a folder holding train.txt, valid.txt and test.txt;\n"
            f"  - set {URL_ENV} to a URL that serves those three files (now {wikitext2_url()});\n"
            "  - pass --data PATH with such a folder.",
            title="fastlm: WARNING: no Wikitext-2",
            border_style="bold red",
        )
    )
    corpus = generated_corpus()
    corpus.source += " (fallback: Wikitext-2 was not available)"
    return corpus
