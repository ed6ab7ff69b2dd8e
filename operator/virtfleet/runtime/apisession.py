"""kopf's HTTP session to the apiserver, with a bounded connection pool.

kopf builds its aiohttp session with ``TCPConnector(limit=0)``: no limit. Every object
it handles at the same moment (a finalizer to add or remove, a retried handler's
progress) may open one more TLS connection, and an idle one is only closed after 15 s,
so under steady churn the pool never shrinks. Each connection costs ~0.26 MiB
(asyncio's 256 KiB TLS read buffer plus OpenSSL's state): the churn test measured
80 connections and 21 MiB for 100-VM rounds, growing in steps with every new peak of
concurrency — most of what looked like a leak of the agent. With a bounded pool the
surplus requests wait for a free connection instead; at most ~8 MiB.

kopf takes a session of our own through a login handler that returns
:class:`kopf.AiohttpSession` (and closes it when the credentials are replaced). Being
ours, it also names the process (:mod:`virtfleet.runtime.useragent`) and tells
:data:`kopf_requests` of every request kopf makes, so the metrics count kopf's watches
and patches beside virtfleet's own client's.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import kopf

from virtfleet.runtime.credentials import client_session, load_connection
from virtfleet.runtime.kube import resource_of
from virtfleet.runtime.useragent import user_agent

#: Connections to the apiserver: each of kopf's watch streams (one per watched kind,
#: five in the agent, plus kopf's CRD observer) holds one for good, the rest serve
#: short requests. More than ~25 at once gains nothing against one apiserver.
MAX_CONNECTIONS = 32
_KOPF_VERSION = importlib.metadata.version("kopf")


class RequestObserver:
    """Told ``(verb, resource, code)`` of each of kopf's requests (0: no answer), and
    ``(resource, events, bytes)`` of what its watch streams receive, once metrics are on
    (:func:`virtfleet.runtime.metrics.count_requests`)."""

    def __init__(self) -> None:
        self.observer: Callable[[str, str, int], None] | None = None
        self.watch_observer: Callable[[str, int, int], None] | None = None

    def tell(self, method: str, url: Any, code: int) -> None:
        if self.observer is not None:
            verb = "WATCH" if url.query.get("watch") == "true" else method
            self.observer(verb, resource_of(url.path), code)

    def received(self, url: Any, chunk: bytes) -> None:
        """A chunk of a response: on a watch stream each event is one JSON line, so its
        newlines count the events the apiserver sent (before kopf's client-side filters)."""
        if self.watch_observer is not None and url.query.get("watch") == "true":
            self.watch_observer(resource_of(url.path), chunk.count(b"\n"), len(chunk))


kopf_requests = RequestObserver()


def _traced() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def ended(
        _session: aiohttp.ClientSession,
        _ctx: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        kopf_requests.tell(params.method, params.url, params.response.status)

    async def failed(
        _session: aiohttp.ClientSession,
        _ctx: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        kopf_requests.tell(params.method, params.url, 0)

    trace.on_request_end.append(ended)
    trace.on_request_exception.append(failed)
    return trace


class _CountedContent:
    """A watch response's body as kopf reads it (``iter_chunked``), counted on the way."""

    def __init__(self, inner: aiohttp.StreamReader, url: Any) -> None:
        self._inner = inner
        self._url = url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        return self._counted(size)

    async def _counted(self, size: int) -> AsyncIterator[bytes]:
        async for chunk in self._inner.iter_chunked(size):
            kopf_requests.received(self._url, chunk)
            yield chunk


class _CountedResponse(aiohttp.ClientResponse):
    """aiohttp's trace hooks do not see streamed bodies: a watch's are wrapped here."""

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        response = await super().start(connection)
        if self.url.query.get("watch") == "true":
            self.content = cast(aiohttp.StreamReader, _CountedContent(self.content, self.url))
        return response


def bounded_session(info: kopf.ConnectionInfo, limit: int = MAX_CONNECTIONS) -> kopf.AiohttpSession:
    """The session kopf would build from ``info``, with at most ``limit`` connections.

    Needs a running event loop (call it from an async login handler).
    """
    if limit < 8:
        raise ValueError("the watch streams alone hold several connections: limit >= 8")
    session = client_session(
        info,
        limit=limit,
        headers={"User-Agent": f"{user_agent()} kopf/{_KOPF_VERSION}"},
        trace_configs=[_traced()],
        response_class=_CountedResponse,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        priority=info.priority,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
    )


def login(limit: int = MAX_CONNECTIONS, **kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's login with virtfleet's credentials (:func:`load_connection`, read again at
    every login: kopf logs in again after a 401), on a bounded session.

    For an ``async`` ``@kopf.on.login`` handler (``kwargs`` are kopf's).
    """
    return bounded_session(load_connection(), limit)
