"""kopf's session names the process and tells the metrics of every request kopf makes."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import aiohttp
import kopf
import pytest
from aiohttp import web

from virtfleet.runtime import apisession, useragent


@pytest.fixture
def named() -> Iterator[None]:
    before = useragent.user_agent()
    useragent.identify("agent", "node-a")
    yield
    useragent._current = before  # the module's one piece of state, put back


async def test_kopfs_requests_are_named_and_counted(named: None) -> None:
    agents: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        agents.append(request.headers["User-Agent"])
        if request.query:  # a watch: one JSON line per event
            return web.Response(body=b'{"type":"ADDED"}\n{"type":"BOOKMARK"}\n')
        return web.json_response({"items": []}, status=404)

    app = web.Application()
    app.router.add_get("/apis/virtfleet.io/v1/namespaces/{ns}/virtualmachines", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    seen: list[tuple[str, str, int]] = []
    apisession.kopf_requests.observer = lambda verb, resource, code: seen.append(
        (verb, resource, code)
    )
    streamed: list[tuple[str, int, int]] = []
    apisession.kopf_requests.watch_observer = lambda resource, events, size: streamed.append(
        (resource, events, size)
    )
    context = apisession.bounded_session(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
    session = context.aiohttp_session
    try:
        base = f"http://127.0.0.1:{port}/apis/virtfleet.io/v1/namespaces/ns/virtualmachines"
        async with session.get(base, params={"watch": "true"}) as response:
            async for _ in response.content.iter_chunked(1024):  # as kopf reads a watch
                pass
        async with session.get(base) as response:
            await response.read()
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get("http://127.0.0.1:1/api/v1/namespaces/ns/events")
    finally:
        apisession.kopf_requests.observer = None
        apisession.kopf_requests.watch_observer = None
        await session.close()
        await runner.cleanup()
    assert seen == [
        ("WATCH", "virtualmachines", 200),
        ("GET", "virtualmachines", 404),
        ("GET", "events", 0),
    ]
    assert agents[0] == f"virtfleet-agent/0.1.0 (node-a) kopf/{importlib.metadata.version('kopf')}"
    assert [(resource, events) for resource, events, _ in streamed] == [("virtualmachines", 2)]
