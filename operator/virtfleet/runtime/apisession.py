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
:class:`kopf.AiohttpSession` (and closes it when the credentials are replaced).
"""

from __future__ import annotations

import warnings
from typing import Any

import aiohttp
import kopf

#: Connections to the apiserver: each of kopf's watch streams (one per watched kind,
#: five in the agent, plus kopf's CRD observer) holds one for good, the rest serve
#: short requests. More than ~25 at once gains nothing against one apiserver.
MAX_CONNECTIONS = 32


def bounded_session(info: kopf.ConnectionInfo, limit: int = MAX_CONNECTIONS) -> kopf.AiohttpSession:
    """The session kopf would build from ``info``, with at most ``limit`` connections.

    Needs a running event loop (call it from an async login handler).
    """
    if limit < 8:
        raise ValueError("the watch streams alone hold several connections: limit >= 8")
    with warnings.catch_warnings():  # as kopf does: basic auth is deprecated, not removed
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        auth = info.as_aiohttp_basic_auth()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        auth=auth,
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        priority=info.priority,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
    )


def login(limit: int = MAX_CONNECTIONS, **kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's login via the official client's configuration, on a bounded session.

    For an ``async`` ``@kopf.on.login`` handler (``kwargs`` are kopf's).
    """
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return None if info is None else bounded_session(info, limit)
