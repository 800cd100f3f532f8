"""Download Wikitext-2's three files and verify them against their known SHA-256 sums.

Each file is streamed into a temporary file beside its destination, hashed on the way, and renamed into
place only when its sum matches: the destination never holds a partial or wrong file. Network failures
raise DownloadError, which a caller may catch to fall back to another corpus; a file that arrives but is
wrong raises plain FastlmError, since falling back would hide a broken mirror.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fastlm.errors import FastlmError

# Published with the PyTorch examples; these are the files the example's numbers come from.
DEFAULT_WIKITEXT2_URL = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
URL_ENV = "FASTLM_WIKITEXT2_URL"
WIKITEXT2_SHA256 = {
    "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
TIMEOUT_S = 15  # per blocking network operation; long enough for a slow link, short enough to fail fast offline
_CHUNK = 1 << 16

# What urllib raises when the network, not the disk, fails (socket timeouts are TimeoutError, an OSError).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


class DownloadError(FastlmError):
    """The files could not be fetched (offline, server down, HTTP error); the caller may fall back."""


def wikitext2_url() -> str:
    """The base URL to fetch from: $FASTLM_WIKITEXT2_URL if set, else the PyTorch examples repository."""
    return os.environ.get(URL_ENV) or DEFAULT_WIKITEXT2_URL


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_wikitext2(dest, base_url: str | None = None, console: Console | None = None) -> Path:
    """Fetch train/valid/test.txt from ``base_url`` (default wikitext2_url()) into ``dest``; returns ``dest``.

    Files already in ``dest`` with the right sum are kept, so an interrupted download resumes file by file.
    """
    dest = Path(dest).expanduser()
    base_url = base_url or wikitext2_url()
    if not base_url.endswith("/"):
        base_url += "/"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FastlmError(
            f"cannot create {dest} for Wikitext-2 ({error.strerror}): set FASTLM_CACHE_DIR to a writable folder"
        ) from None
    missing = [name for name, digest in WIKITEXT2_SHA256.items() if not _has_file(dest / name, digest)]
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    # A progress bar is noise in a log file; rich would only print its final frame there.
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        for name in missing:
            _fetch(base_url + name, dest / name, WIKITEXT2_SHA256[name], progress)
    return dest


def _has_file(path: Path, digest: str) -> bool:
    return path.is_file() and file_sha256(path) == digest


def _fetch(url: str, path: Path, expected: str, progress: Progress) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as error:
        raise FastlmError(
            f"cannot write in {path.parent} ({error.strerror}): make it writable or set FASTLM_CACHE_DIR"
        ) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, progress, path.name)
        if actual != expected:
            raise FastlmError(
                f"{path.name} from {url} has SHA-256 {actual} but Wikitext-2's is {expected}: "
                f"the server sent a different file; point {URL_ENV} at a correct copy"
            )
        os.replace(tmp, path)
    except OSError as error:  # the disk, not the network: _stream turns network errors into DownloadError
        raise FastlmError(
            f"cannot write {path} ({error.strerror or error}): free some space or set FASTLM_CACHE_DIR"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out, progress: Progress, name: str) -> str:
    """Copy ``url`` into ``out``, returning the SHA-256 of what arrived."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            task = progress.add_task(f"Wikitext-2 {name}", total=int(size) if size else None)
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                progress.advance(task, len(chunk))
    except _NETWORK_ERRORS as error:
        if isinstance(error, urllib.error.HTTPError):
            reason = f"HTTP {error.code} {error.reason}"
        else:
            reason = getattr(error, "reason", None) or error  # URLError wraps the socket error in .reason
        raise DownloadError(
            f"could not download {url}: {reason}; check the network or set {URL_ENV} to a reachable copy"
        ) from None
    return digest.hexdigest()
