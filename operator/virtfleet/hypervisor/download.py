"""Downloading a disk image from ``source.http``: bounded, verified, never trusted early.

The body is streamed into a temporary file while it is hashed and counted; nothing is
kept unless the byte count stayed within the limit and the SHA-256 matched. Redirects
may only lead to http(s). Blocking (urllib): the agent runs :func:`fetch` in an executor,
so the event loop never waits on a socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["DownloadError", "Downloaded", "fetch"]

CHUNK = 1024 * 1024
ALLOWED_SCHEMES = frozenset({"http", "https"})
#: Seconds without progress (connect, or between two reads) before giving up.
DEFAULT_TIMEOUT_S = 60.0
#: Longest whole download (a server dribbling bytes must not hold a worker forever).
DEFAULT_DEADLINE_S = 3600.0

#: Reasons, as they appear in the VM's Stalled condition and Events.
CHECKSUM_MISMATCH = "ChecksumMismatch"
SOURCE_TOO_LARGE = "SourceTooLarge"
DOWNLOAD_FAILED = "DownloadFailed"


class DownloadError(Exception):
    """The download was refused or failed; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A verified download: the file at ``path`` is the caller's to use and delete."""

    path: Path
    size: int
    sha256: str


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise DownloadError(
                DOWNLOAD_FAILED, f"redirect to a {scheme or 'relative'}: URL refused ({newurl})"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # No FileHandler/FTPHandler/DataHandler: build_opener adds them by default.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _HttpOnlyRedirects(),
    ):
        opener.add_handler(handler)
    return opener


def _too_large(size: int, limit: int) -> DownloadError:
    return DownloadError(
        SOURCE_TOO_LARGE, f"the download is larger than the limit of {limit} bytes ({size}+)"
    )


def fetch(
    url: str,
    sha256: str,
    directory: Path,
    max_bytes: int,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    deadline: float = DEFAULT_DEADLINE_S,
) -> Downloaded:
    """Download ``url`` into a new file in ``directory``; verify size and ``sha256``.

    Raises :class:`DownloadError` (ChecksumMismatch, SourceTooLarge, DownloadFailed) and
    then leaves no file behind. A body over ``max_bytes`` is refused from its
    Content-Length when the server sends one, else as soon as it grows past the limit.
    """
    if urllib.parse.urlsplit(url).scheme.lower() not in ALLOWED_SCHEMES:
        raise DownloadError(DOWNLOAD_FAILED, f"only http and https URLs are downloaded: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "virtfleet-agent"})
    fd, name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = _stream(request, out, max_bytes, timeout, time.monotonic() + deadline)
        if digest != sha256.lower():
            raise DownloadError(
                CHECKSUM_MISMATCH, f"sha256 of {url} is {digest}, the spec expects {sha256}"
            )
        return Downloaded(path=path, size=size, sha256=digest)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _stream(
    request: urllib.request.Request,
    out: IO[bytes],
    max_bytes: int,
    timeout: float,
    give_up_at: float,
) -> tuple[str, int]:
    url = request.full_url
    hasher = hashlib.sha256()
    size = 0
    try:
        with _opener().open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(int(declared), max_bytes)
            while chunk := response.read1(CHUNK):  # what arrived: the deadline holds
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(size, max_bytes)
                hasher.update(chunk)
                out.write(chunk)
                if time.monotonic() > give_up_at:
                    raise DownloadError(DOWNLOAD_FAILED, f"GET {url}: too slow, gave up")
    except DownloadError:
        raise
    except urllib.error.HTTPError as exc:
        raise DownloadError(DOWNLOAD_FAILED, f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(DOWNLOAD_FAILED, f"GET {url}: {reason}") from exc
    if size == 0:
        raise DownloadError(DOWNLOAD_FAILED, f"GET {url}: empty body")
    return hasher.hexdigest(), size
