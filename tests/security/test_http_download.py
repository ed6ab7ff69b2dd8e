"""``source.http`` downloads against a loopback HTTP server: checksum, size limit, redirects.

Nothing may be kept unless it is within the limit and matches its SHA-256, and a refusal
must say which of the three reasons it was.
"""

from __future__ import annotations

import hashlib
import http.server
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.httpserve import serve
from virtfleet.hypervisor import download

BODY = b"virtfleet" * 10_000
SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok: BODY; /chunked: BODY without Content-Length; /redirect-*: 302s; else 404."""

    def do_GET(self) -> None:
        routes = {
            "/redirect-file": "file:///etc/shadow",
            "/redirect-ftp": "ftp://127.0.0.1/x",
            "/redirect-ok": "/ok",
        }
        if self.path in routes:
            self.send_response(302)
            self.send_header("Location", routes[self.path])
            self.end_headers()
        elif self.path == "/ok":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            for _ in range(20):  # a byte now and then: never a socket timeout
                self.wfile.write(b"v")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/chunked":
            self.send_response(200)  # no length: the limit must hold while streaming
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve(Handler) as base:
        yield base


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_verified_download(server: str, tmp_path: Path) -> None:
    got = download.fetch(f"{server}/ok", SHA, tmp_path, len(BODY))
    assert got.path.read_bytes() == BODY
    assert (got.size, got.sha256) == (len(BODY), SHA)
    assert got.path.parent == tmp_path


def test_redirect_within_http_is_followed(server: str, tmp_path: Path) -> None:
    got = download.fetch(f"{server}/redirect-ok", SHA, tmp_path, len(BODY))
    assert got.path.read_bytes() == BODY


def test_checksum_mismatch_keeps_nothing(server: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}/ok", "0" * 64, tmp_path, len(BODY))
    assert caught.value.reason == download.CHECKSUM_MISMATCH
    assert SHA in caught.value.message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["/ok", "/chunked"])
def test_body_over_the_limit_is_refused_and_not_stored(
    server: str, tmp_path: Path, path: str
) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}{path}", SHA, tmp_path, len(BODY) - 1)
    assert caught.value.reason == download.SOURCE_TOO_LARGE
    assert str(len(BODY) - 1) in caught.value.message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["/redirect-file", "/redirect-ftp"])
def test_redirect_to_another_scheme_is_refused(server: str, tmp_path: Path, path: str) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}{path}", SHA, tmp_path, len(BODY))
    assert caught.value.reason == download.DOWNLOAD_FAILED
    message = caught.value.message
    assert "URL refused" in message or "is not allowed" in message, message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello", "gopher://x"]
)
def test_only_http_urls_are_fetched(url: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(url, SHA, tmp_path, 10**9)
    assert caught.value.reason == download.DOWNLOAD_FAILED
    assert leftovers(tmp_path) == []


def test_http_errors_and_dead_servers_are_download_failures(server: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}/missing", SHA, tmp_path, 10**9)
    assert (caught.value.reason, "HTTP 404" in caught.value.message) == (
        download.DOWNLOAD_FAILED,
        True,
    )
    with pytest.raises(download.DownloadError) as refused:
        download.fetch("http://127.0.0.1:9/x", SHA, tmp_path, 10**9, timeout=5)
    assert refused.value.reason == download.DOWNLOAD_FAILED
    assert leftovers(tmp_path) == []


def test_a_dribbling_server_is_given_up_on(server: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}/slow", SHA, tmp_path, 10**9, timeout=5, deadline=0.5)
    assert caught.value.reason == download.DOWNLOAD_FAILED
    assert "too slow" in caught.value.message
    assert leftovers(tmp_path) == []
