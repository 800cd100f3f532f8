"""The Wikitext-2 downloader against a local HTTP server (fastlm.data.download)."""

import contextlib
import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from fastlm.data import download
from fastlm.data.download import DownloadError, download_wikitext2
from fastlm.errors import FastlmError

NAMES = ("train.txt", "valid.txt", "test.txt")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def serving(folder: Path):
    """Serve ``folder`` on 127.0.0.1 at a free port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits for the serving loop to notice it (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def write_fake_files(folder: Path) -> dict[str, bytes]:
    """Small stand-ins for the three files (their sums are not Wikitext-2's); returns name -> contents."""
    folder.mkdir()
    contents = {name: f"{name} line one\nline two\n".encode() for name in NAMES}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return contents


def fake_files(folder: Path, monkeypatch) -> dict[str, bytes]:
    """write_fake_files, with the expected sums patched to theirs for this test."""
    contents = write_fake_files(folder)
    for name, data in contents.items():
        monkeypatch.setitem(download.WIKITEXT2_SHA256, name, hashlib.sha256(data).hexdigest())
    return contents


def test_good_files_are_verified_and_land(tmp_path, monkeypatch):
    contents = fake_files(tmp_path / "served", monkeypatch)
    with serving(tmp_path / "served") as url:
        dest = download_wikitext2(tmp_path / "dest", base_url=url)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == contents  # and no temporary files left


def test_base_url_comes_from_the_environment(tmp_path, monkeypatch):
    fake_files(tmp_path / "served", monkeypatch)
    with serving(tmp_path / "served") as url:
        monkeypatch.setenv("FASTLM_WIKITEXT2_URL", url.rstrip("/"))  # a missing final slash is fine
        download_wikitext2(tmp_path / "dest")
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(NAMES)


def test_files_already_present_and_right_are_kept(tmp_path, monkeypatch):
    contents = fake_files(tmp_path / "served", monkeypatch)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "train.txt").write_bytes(contents["train.txt"])
    (tmp_path / "served" / "train.txt").unlink()  # fetching it again would fail
    with serving(tmp_path / "served") as url:
        download_wikitext2(tmp_path / "dest", base_url=url)
    assert {p.name: p.read_bytes() for p in (tmp_path / "dest").iterdir()} == contents


def test_wrong_contents_are_refused_and_removed(tmp_path, monkeypatch):
    fake_files(tmp_path / "served", monkeypatch)
    (tmp_path / "served" / "valid.txt").write_bytes(b"something else\n")
    with serving(tmp_path / "served") as url, pytest.raises(FastlmError) as info:
        download_wikitext2(tmp_path / "dest", base_url=url)
    message = str(info.value)
    assert not isinstance(info.value, DownloadError)  # a wrong file must not be mistaken for being offline
    assert "valid.txt" in message and "\n" not in message
    assert download.WIKITEXT2_SHA256["valid.txt"] in message
    assert hashlib.sha256(b"something else\n").hexdigest() in message
    assert "valid.txt" not in [p.name for p in (tmp_path / "dest").iterdir()]
    assert not [p for p in (tmp_path / "dest").iterdir() if p.name.startswith(".")]


def test_unreachable_server_raises_download_error(tmp_path):
    with pytest.raises(DownloadError) as info:
        download_wikitext2(tmp_path / "dest", base_url=closed_port_url())
    assert "could not download" in str(info.value) and "\n" not in str(info.value)
    assert list((tmp_path / "dest").iterdir()) == []


def test_missing_file_on_server_raises_download_error(tmp_path, monkeypatch):
    fake_files(tmp_path / "served", monkeypatch)
    (tmp_path / "served" / "test.txt").unlink()
    with serving(tmp_path / "served") as url, pytest.raises(DownloadError, match="HTTP 404"):
        download_wikitext2(tmp_path / "dest", base_url=url)


def test_real_wikitext2_checks_against_the_published_sums(wikitext2_dir, tmp_path):
    with serving(wikitext2_dir) as url:
        download_wikitext2(tmp_path / "dest", base_url=url)
    for name in NAMES:
        assert (tmp_path / "dest" / name).read_bytes() == (wikitext2_dir / name).read_bytes()
