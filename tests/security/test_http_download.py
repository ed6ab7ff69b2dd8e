"""``source.http`` downloads against a loopback HTTP server: checksum, size limit, redirects.

Nothing may be kept unless it is within the limit and matches its SHA-256, and a refusal
must say which reason it was. The server is on 127.0.0.1, which the default deny-list
refuses: these tests allow it explicitly (``LOOPBACK``), as the e2e harness's agents do.
"""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from testkit.httpserve import serve
from virtfleet.hypervisor import download

BODY = b"virtfleet" * 10_000
SHA = hashlib.sha256(BODY).hexdigest()
LOOPBACK = download.DestinationPolicy.from_cidrs(allowed=["127.0.0.0/8"])


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok: BODY; /chunked: BODY without Content-Length; /redirect-*: 302s; else 404.

    /forbidden and /garbage play an internal service whose words must not reach a VM's
    conditions (a reason phrase and body, a status line that is not HTTP).
    """

    def do_GET(self) -> None:
        # An AF_INET server: its address is (host, port).
        port = cast(tuple[str, int], self.server.server_address)[1]
        routes = {
            "/redirect-file": "file:///etc/shadow",
            "/redirect-ftp": "ftp://127.0.0.1/x",
            "/redirect-ok": "/ok",
            "/redirect-denied": f"http://127.0.0.2:{port}/ok",
            "/redirect-secret": "ftp://internal-secret-host/x",
        }
        if self.path == "/forbidden":
            self.send_response(403, "Forbidden by internal-admin")
            self.send_header("Content-Length", "12")
            self.end_headers()
            self.wfile.write(b"secret-token")
        elif self.path == "/garbage":
            self.wfile.write(b"HTTP/1.1 abc internal-secret\r\n\r\n")
        elif self.path in routes:
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
    got = download.fetch(f"{server}/ok", SHA, tmp_path, len(BODY), policy=LOOPBACK)
    assert got.path.read_bytes() == BODY
    assert (got.size, got.sha256) == (len(BODY), SHA)
    assert got.path.parent == tmp_path


def test_redirect_within_http_is_followed(server: str, tmp_path: Path) -> None:
    got = download.fetch(f"{server}/redirect-ok", SHA, tmp_path, len(BODY), policy=LOOPBACK)
    assert got.path.read_bytes() == BODY


def test_checksum_mismatch_keeps_nothing(server: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}/ok", "0" * 64, tmp_path, len(BODY), policy=LOOPBACK)
    assert caught.value.reason == download.CHECKSUM_MISMATCH
    assert "0" * 64 in caught.value.message
    # What the URL served is not told to the VM's owner (an internal page's digest and
    # size would be an oracle); the agent's log has it.
    assert SHA not in caught.value.message
    assert str(len(BODY)) not in caught.value.message
    assert SHA in caught.value.detail
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["/ok", "/chunked"])
def test_body_over_the_limit_is_refused_and_not_stored(
    server: str, tmp_path: Path, path: str
) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}{path}", SHA, tmp_path, len(BODY) - 1, policy=LOOPBACK)
    assert caught.value.reason == download.SOURCE_TOO_LARGE
    assert str(len(BODY) - 1) in caught.value.message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["/redirect-file", "/redirect-ftp"])
def test_redirect_to_another_scheme_is_refused(server: str, tmp_path: Path, path: str) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}{path}", SHA, tmp_path, len(BODY), policy=LOOPBACK)
    assert caught.value.reason == download.DOWNLOAD_FAILED
    message = caught.value.message
    assert "URL was refused" in message or "redirect that was not followed" in message, message
    assert "etc/shadow" not in message  # the Location is not echoed
    assert "ftp://" not in message
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
        download.fetch(f"{server}/missing", SHA, tmp_path, 10**9, policy=LOOPBACK)
    assert (caught.value.reason, "HTTP 404" in caught.value.message) == (
        download.DOWNLOAD_FAILED,
        True,
    )
    with pytest.raises(download.DownloadError) as refused:
        download.fetch("http://127.0.0.1:9/x", SHA, tmp_path, 10**9, timeout=5, policy=LOOPBACK)
    assert refused.value.reason == download.DOWNLOAD_FAILED
    assert leftovers(tmp_path) == []


def test_a_dribbling_server_is_given_up_on(server: str, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(
            f"{server}/slow", SHA, tmp_path, 10**9, timeout=5, deadline=0.5, policy=LOOPBACK
        )
    assert caught.value.reason == download.DOWNLOAD_FAILED
    assert "too slow" in caught.value.message
    assert leftovers(tmp_path) == []


def test_loopback_is_denied_by_default_and_nothing_is_requested(
    server: str, tmp_path: Path
) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}/ok", SHA, tmp_path, len(BODY))
    assert caught.value.reason == download.DESTINATION_DENIED
    assert "127.0.0.1 resolves only to addresses this agent may not download from" in str(
        caught.value.message
    )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.1.2.3", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::",
     "::ffff:127.0.0.1", "::ffff:169.254.169.254"],
)  # fmt: skip
def test_default_policy_denies_loopback_link_local_and_unspecified(address: str) -> None:
    assert not download.DestinationPolicy.from_cidrs().permits(ipaddress.ip_address(address))


def test_allowed_ranges_are_exceptions_to_the_denied_ones() -> None:
    policy = download.DestinationPolicy.from_cidrs(
        denied=["10.0.0.0/8", "127.0.0.0/8"], allowed=["127.0.0.1/32"]
    )
    assert policy.permits(ipaddress.ip_address("127.0.0.1"))
    assert not policy.permits(ipaddress.ip_address("127.0.0.2"))
    assert not policy.permits(ipaddress.ip_address("10.1.2.3"))
    assert policy.permits(ipaddress.ip_address("192.0.2.7"))


def test_a_redirect_to_a_denied_address_is_refused(server: str, tmp_path: Path) -> None:
    only_this = download.DestinationPolicy.from_cidrs(allowed=["127.0.0.1/32"])
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}/redirect-denied", SHA, tmp_path, len(BODY), policy=only_this)
    assert caught.value.reason == download.DESTINATION_DENIED
    assert "a redirect leads" in caught.value.message
    assert "127.0.0.2" not in caught.value.message  # where the remote pointed is not told
    assert leftovers(tmp_path) == []


def test_the_host_is_resolved_once_and_the_checked_address_is_used(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a second lookup would answer a denied address; there is none."""
    real = socket.getaddrinfo
    port = int(server.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    asked: list[str] = []

    def rebinding(host: str, *args: object, **kwargs: object) -> object:
        if host != "images.example":
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        asked.append(host)
        return real(next(answers), port, 0, socket.SOCK_STREAM)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    only_this = download.DestinationPolicy.from_cidrs(allowed=["127.0.0.1/32"])
    got = download.fetch(f"http://images.example:{port}/ok", SHA, tmp_path, len(BODY),
                         policy=only_this)  # fmt: skip
    assert got.path.read_bytes() == BODY
    assert asked == ["images.example"]
    with pytest.raises(download.DownloadError) as caught:  # now it answers 127.0.0.2
        download.fetch(f"http://images.example:{port}/ok", SHA, tmp_path, len(BODY),
                       policy=only_this)  # fmt: skip
    assert caught.value.reason == download.DESTINATION_DENIED


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/forbidden", "HTTP 403"),
        ("/garbage", "did not answer with valid HTTP"),
        ("/redirect-secret", "URL was refused"),
    ],
)
def test_refusals_do_not_echo_what_the_remote_said(
    server: str, tmp_path: Path, path: str, words: str
) -> None:
    """An agent must not be an oracle for internal services (their words stay out)."""
    with pytest.raises(download.DownloadError) as caught:
        download.fetch(f"{server}{path}", SHA, tmp_path, 10**9, policy=LOOPBACK)
    message = caught.value.message
    assert caught.value.reason == download.DOWNLOAD_FAILED
    assert words in message, message
    for secret in ("internal", "secret-token", "Forbidden"):
        assert secret not in message, message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://[::1/x", "Invalid IPv6 URL"),
        ("http://h:abc/x", "Port could not be cast"),
        ("http://h:99999/x", "Port out of range"),
        ("http://h/a\x01b", "contains '\\x01'"),
        ("http://h/a\x7fb", "contains '\\x7f'"),
        ("http://h/é", "printable ASCII"),
        ("http://user:pw@h/x", "credentials"),
        ("http:///x", "no host"),
    ],
)
def test_urls_urllib_cannot_fetch_are_refused_as_download_failures(
    url: str, words: str, tmp_path: Path
) -> None:
    with pytest.raises(download.DownloadError) as caught:
        download.check_url(url)
    assert caught.value.reason == download.DOWNLOAD_FAILED
    assert "invalid URL" in caught.value.message
    assert words in caught.value.message, caught.value.message
    with pytest.raises(download.DownloadError):
        download.fetch(url, SHA, tmp_path, 10**9)
    assert leftovers(tmp_path) == []
