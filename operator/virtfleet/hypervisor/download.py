"""Downloading a disk image from ``source.http``: bounded, verified, never trusted early.

The body is streamed into a temporary file while it is hashed and counted; nothing is
kept unless the byte count stayed within the limit and the SHA-256 matched. Redirects
may only lead to http(s). Every connection (the first and each redirect's) resolves the
host once, refuses addresses in the :class:`DestinationPolicy`'s denied ranges and
connects to the very address it checked, so DNS rebinding cannot slip past the check.
Refusals say what the user needs (an HTTP status code, "connection refused"), never a
remote's reason phrase, body or redirect target: an agent inside the cluster must not
become an oracle for internal services. Blocking (urllib): the agent runs :func:`fetch`
in an executor, so the event loop never waits on a socket.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_DENIED_CIDRS",
    "DestinationPolicy",
    "DownloadError",
    "Downloaded",
    "check_url",
    "denied_cidrs",
    "fetch",
]

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
DESTINATION_DENIED = "DestinationDenied"

#: Denied unless an admin says otherwise: loopback, link-local (cloud metadata services
#: live at 169.254.169.254) and the unspecified addresses (connecting to 0.0.0.0 or ::
#: reaches the local host on Linux).
DEFAULT_DENIED_CIDRS: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/8",
    "::/128",
)


def denied_cidrs(flags: Iterable[str] | None) -> tuple[str, ...]:
    """The agent's ``--http-deny-cidr`` flags: none given, the default; ``none``, no range."""
    return tuple(c for c in (flags or DEFAULT_DENIED_CIDRS) if c != "none")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DownloadError(Exception):
    """The download was refused or failed; ``reason`` is one of the constants above.

    ``message`` is what the VM's condition says; ``detail`` is for the agent's log only
    (what the remote sent: a digest, a size), never shown to the VM's owner.
    """

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Which addresses a download may connect to: any, except ``denied`` minus ``allowed``.

    ``allowed`` carves exceptions out of ``denied`` (e.g. a test harness serving images
    on 127.0.0.1). IPv4-mapped IPv6 addresses are judged as the IPv4 address they are.
    """

    denied: tuple[Network, ...]
    allowed: tuple[Network, ...] = ()

    @classmethod
    def from_cidrs(
        cls, denied: Iterable[str] = DEFAULT_DENIED_CIDRS, allowed: Iterable[str] = ()
    ) -> DestinationPolicy:
        """Raises ValueError for a CIDR that does not parse (the agent refuses to start)."""
        return cls(
            tuple(ipaddress.ip_network(c, strict=False) for c in denied),
            tuple(ipaddress.ip_network(c, strict=False) for c in allowed),
        )

    def permits(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allowed):
            return True
        return not any(address in net for net in self.denied)


class _BadRedirect(Exception):  # noqa: N818 - an outcome, turned into a DownloadError
    """A redirect to a URL :func:`check_url` refuses (ftp:, file:, a malformed one)."""

    def __init__(self, code: int, location: str) -> None:
        super().__init__(location)
        self.code = code
        self.location = location


class _Denied(Exception):  # noqa: N818 - an outcome, turned into a DownloadError
    """Every address of ``host`` is denied (raised where the socket would be opened)."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host


def check_url(url: str) -> None:
    """Refuse a URL urllib could not fetch as given: DownloadFailed with the reason.

    Checked before anything is made for the disk, so a typo is a clear refusal instead
    of an error deep in http.client.
    """
    bad = next((c for c in url if not 0x21 <= ord(c) <= 0x7E), None)
    if bad is not None:
        raise DownloadError(
            DOWNLOAD_FAILED,
            f"invalid URL: it contains {bad!r}; a URL is printable ASCII without spaces "
            "(percent-encode other characters)",
        )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise DownloadError(DOWNLOAD_FAILED, f"invalid URL {url}: {exc}") from exc
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise DownloadError(DOWNLOAD_FAILED, f"only http and https URLs are downloaded: {url}")
    if not parts.hostname:
        raise DownloadError(DOWNLOAD_FAILED, f"invalid URL {url}: no host")
    if "@" in parts.netloc:
        raise DownloadError(
            DOWNLOAD_FAILED, f"invalid URL {url}: credentials in a URL are not supported"
        )


def _connect(
    address: tuple[str, int],
    timeout: Any = None,
    source_address: tuple[str, int] | None = None,
    *,
    policy: DestinationPolicy,
) -> socket.socket:
    """``socket.create_connection``, but only to addresses ``policy`` permits.

    The host is resolved once, and the socket connects to the checked address itself
    (no second lookup that a rebinding DNS server could answer differently).
    """
    host, port = address
    last: OSError | None = None
    denied = False
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        if not policy.permits(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])):
            denied = True
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, int | float):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    if last is not None:
        raise last
    if denied:
        raise _Denied(host)
    raise OSError(errno.EADDRNOTAVAIL, "no address to connect to")


class _GuardedHTTP(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: DestinationPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect, policy=policy)


class _GuardedHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: DestinationPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect, policy=policy)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: DestinationPolicy) -> None:
        super().__init__()
        self._policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTP, policy=self._policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: DestinationPolicy) -> None:
        super().__init__()
        self._policy = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPS, policy=self._policy), req)


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
        try:
            check_url(newurl)  # urllib made it absolute
        except DownloadError as exc:
            raise _BadRedirect(code, newurl) from exc
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(policy: DestinationPolicy) -> urllib.request.OpenerDirector:
    # No FileHandler/FTPHandler/DataHandler: build_opener adds them by default.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        _HTTPHandler(policy),
        _HTTPSHandler(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _HttpOnlyRedirects(),
    ):
        opener.add_handler(handler)
    return opener


def _too_large(size: int, limit: int) -> DownloadError:
    return DownloadError(
        SOURCE_TOO_LARGE,
        f"the download is larger than the limit of {limit} bytes",
        detail=f"{size}+ bytes",
    )


def fetch(
    url: str,
    sha256: str,
    directory: Path,
    max_bytes: int,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    deadline: float = DEFAULT_DEADLINE_S,
    policy: DestinationPolicy | None = None,
) -> Downloaded:
    """Download ``url`` into a new file in ``directory``; verify size and ``sha256``.

    Raises :class:`DownloadError` (ChecksumMismatch, SourceTooLarge, DownloadFailed,
    DestinationDenied) and then leaves no file behind. A body over ``max_bytes`` is
    refused from its Content-Length when the server sends one, else as soon as it grows
    past the limit. ``policy`` defaults to denying :data:`DEFAULT_DENIED_CIDRS`.
    """
    check_url(url)
    policy = policy or DestinationPolicy.from_cidrs()
    request = urllib.request.Request(url, headers={"User-Agent": "virtfleet-agent"})
    fd, name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = _stream(
                request, out, max_bytes, timeout, time.monotonic() + deadline, policy
            )
        if digest != sha256.lower():
            # Not the digest itself: it would tell what an internal URL serves.
            raise DownloadError(
                CHECKSUM_MISMATCH,
                f"the sha256 of what {url} served is not the one the spec expects ({sha256})",
                detail=f"sha256 {digest}, {size} bytes",
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
    policy: DestinationPolicy,
) -> tuple[str, int]:
    url = request.full_url
    hasher = hashlib.sha256()
    size = 0
    try:
        with _opener(policy).open(request, timeout=timeout) as response:
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
    except _Denied as exc:
        raise _denied(request, exc.host) from exc
    except _BadRedirect as exc:
        # Not the target itself: a remote's Location header is not echoed.
        raise DownloadError(
            DOWNLOAD_FAILED,
            f"GET {url}: a redirect (HTTP {exc.code}) to a URL that is not a valid http(s) "
            "URL was refused",
            detail=f"Location: {exc.location!r}",
        ) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, _Denied):
            raise _denied(request, exc.reason.host) from exc
        raise _failed(url, exc) from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise _failed(url, exc) from exc
    if size == 0:
        raise DownloadError(DOWNLOAD_FAILED, f"GET {url}: empty body")
    return hasher.hexdigest(), size


def _denied(request: urllib.request.Request, host: str) -> DownloadError:
    first = urllib.parse.urlsplit(request.full_url).hostname
    where = f"{host} resolves" if host == first else "a redirect leads"
    return DownloadError(
        DESTINATION_DENIED,
        f"GET {request.full_url}: {where} only to addresses this agent may not download "
        "from (loopback, link-local or a range the admin denied: agent.httpSource.denyCIDRs)",
        detail=f"host {host}",
    )


def _failed(url: str, exc: BaseException) -> DownloadError:
    """DownloadFailed saying only what the user needs: a status code, or what went wrong
    on the connection in our own words (never the remote's reason phrase or body)."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, urllib.error.HTTPError):
        what = f"HTTP {exc.code}"
        if 300 <= exc.code < 400:
            what += ": a redirect that was not followed (a loop, too many, or not to http(s))"
    else:
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        what = _connection_problem(cause)
    return DownloadError(DOWNLOAD_FAILED, f"GET {url}: {what}", detail=detail)


def _connection_problem(cause: object) -> str:
    match cause:
        case socket.gaierror():
            return "the host name does not resolve"
        case TimeoutError():
            return "timed out"
        case ConnectionRefusedError():
            return "connection refused"
        case ConnectionResetError() | BrokenPipeError() | http.client.RemoteDisconnected():
            return "the connection was closed by the server"
        case ssl.SSLCertVerificationError():
            return "the server's TLS certificate does not verify"
        case ssl.SSLError():
            return "TLS failed"
        case http.client.HTTPException():
            return "the server did not answer with valid HTTP"
        case OSError(errno=int(code)) if code in errno.errorcode:
            return f"connection failed ({errno.errorcode[code]})"
        case ValueError():
            return "the URL cannot be requested"
    return "the download failed"
