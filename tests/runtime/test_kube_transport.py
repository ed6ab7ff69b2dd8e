"""KubeClient's own HTTP transport (aiohttp), against a local HTTP server standing in for
the apiserver's REST answers: bodies, errors as the protocol's exceptions, a rotated
token read again after a 401, an unreachable server, the metrics observer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from aiohttp import web

from virtfleet.runtime import kube as kube_module
from virtfleet.runtime.kube import ApiUnavailable, Conflict, Forbidden, KubeClient, NotFound

VMS = "/apis/virtfleet.io/v1alpha1/namespaces/ns/virtualmachines"


class Apiserver:
    """Just enough REST: one VM, a token to accept, what each request carried."""

    def __init__(self) -> None:
        self.token = "good"
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "auth": request.headers.get("Authorization"),
                "type": request.headers.get("Content-Type"),
                "agent": request.headers.get("User-Agent"),
                "body": json.loads(body) if body else None,
            }
        )
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "reason": "Unauthorized"}, status=401)
        if request.method == "GET" and request.path == f"{VMS}/web":
            return web.json_response({"metadata": {"name": "web"}})
        if request.method == "POST":
            return web.json_response({"kind": "Status", "reason": "AlreadyExists"}, status=409)
        if request.method == "PATCH":
            return web.json_response(await request.json())
        return web.json_response(
            {"kind": "Status", "reason": "NotFound", "message": "not there"}, status=404
        )


@pytest.fixture
async def apiserver() -> AsyncIterator[tuple[Apiserver, str]]:
    fake = Apiserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_bodies_errors_and_what_each_request_carries(
    apiserver: tuple[Apiserver, str],
) -> None:
    fake, server = apiserver
    kube = KubeClient(kopf.ConnectionInfo(server=server, token="good"), field_manager="me")
    told: list[tuple[str, str, int]] = []
    kube.observer = lambda verb, resource, code: told.append((verb, resource, code))
    try:
        assert await kube.get("VirtualMachine", "ns", "web") == {"metadata": {"name": "web"}}
        with pytest.raises(NotFound, match="not there"):
            await kube.get("VirtualMachine", "ns", "gone")
        with pytest.raises(Conflict):
            await kube.create("VirtualMachine", {"metadata": {"name": "web", "namespace": "ns"}})
        patched = await kube.patch_status("VirtualMachine", "ns", "web", {"phase": "Running"})
        assert patched == {"status": {"phase": "Running"}}
    finally:
        await kube.close()
    patch = fake.seen[-1]
    assert patch["type"] == "application/merge-patch+json"
    assert patch["query"] == {"fieldManager": "me"}
    assert patch["path"] == f"{VMS}/web/status"
    assert all(seen["auth"] == "Bearer good" and seen["agent"] for seen in fake.seen)
    assert told == [
        ("GET", "virtualmachines", 200),
        ("GET", "virtualmachines", 404),
        ("POST", "virtualmachines", 409),
        ("PATCH", "virtualmachines/status", 200),
    ]


async def test_a_rotated_token_is_read_again_after_a_401(
    apiserver: tuple[Apiserver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, server = apiserver
    tokens = iter(["old", "new"])
    monkeypatch.setattr(
        kube_module,
        "load_connection",
        lambda: kopf.ConnectionInfo(server=server, token=next(tokens)),
    )
    fake.token = "new"
    kube = KubeClient()
    try:
        assert await kube.get("VirtualMachine", "ns", "web")
    finally:
        await kube.close()
    assert [seen["auth"] for seen in fake.seen] == ["Bearer old", "Bearer new"]


async def test_given_credentials_that_are_refused_stay_refused(
    apiserver: tuple[Apiserver, str],
) -> None:
    fake, server = apiserver
    kube = KubeClient(kopf.ConnectionInfo(server=server, token="bad"))
    try:
        with pytest.raises(Forbidden):
            await kube.get("VirtualMachine", "ns", "web")
    finally:
        await kube.close()
    assert len(fake.seen) == 1  # nothing newer to read: no second try


async def test_an_unreachable_apiserver_is_unavailable() -> None:
    kube = KubeClient(kopf.ConnectionInfo(server="http://127.0.0.1:1"), request_timeout=5.0)
    told: list[int] = []
    kube.observer = lambda verb, resource, code: told.append(code)
    try:
        with pytest.raises(ApiUnavailable, match="get VirtualMachine ns/web"):
            await kube.get("VirtualMachine", "ns", "web")
    finally:
        await kube.close()
    assert told == [0]
