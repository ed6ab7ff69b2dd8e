"""``virtfleet console``'s server side: each node agent serves its VMs' serial consoles.

``GET <base>/apis/virtfleet.io/v1alpha1/namespaces/<ns>/virtualmachines/<vm>/console``
upgraded to a WebSocket: binary frames both ways carry the console's bytes. Before the
upgrade the caller is authenticated and authorised by the apiserver
(:mod:`virtfleet.agent.consoleauth`); then libvirt relays the guest's pty
(:mod:`virtfleet.hypervisor.console`). The user never gets libvirt access, and learns no
more than the endpoint the VM's status names.

Why an agent endpoint and not an aggregated API (KubeVirt's ``subresources.kubevirt.io``):
an APIService that is down breaks API discovery for every client — ``kubectl`` warns, Argo
CD and Flux fail syncs, namespace deletion stalls — which a GitOps-first product must not
risk; it also needs the apiserver's front-proxy set up and one more hop (apiserver →
proxy → node) for every byte. The cost: clients must reach the agents' console port, as
the apiserver reaches kubelets for ``kubectl exec``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web

from virtfleet.agent.consoleauth import (
    AccessRefusedError,
    Caller,
    ReviewCache,
    authenticate,
    authorize,
)
from virtfleet.agent.consoletls import ServingCertificate, make_certificate, server_context
from virtfleet.api.virtualmachine import ConsoleEndpoint
from virtfleet.domain.errors import InvalidInputError
from virtfleet.domain.ownership import check_name, check_namespace, domain_name, owned_by
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor.console import ConsoleStream, open_console
from virtfleet.identity import API_GROUP, API_VERSION
from virtfleet.logs import get_logger
from virtfleet.runtime.addresses import split_listen
from virtfleet.runtime.kubeapi import KubeError

__all__ = ["ConsoleAddress", "ConsoleServer", "console_path"]

CLIENT_CA_CONFIGMAP: Final = (
    "/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication"
)
#: Where a refusal is explained to WebSocket clients (``virtfleet console`` prints it).
MESSAGE_HEADER: Final = "Virtfleet-Message"
#: A console carries keystrokes and text: large frames are not ours.
MAX_FRAME: Final = 64 * 1024
#: Reviews (TokenReview + SubjectAccessReview) in flight at once; more callers get 429.
MAX_REVIEWS: Final = 4
#: How long a stopping agent waits for its console handlers (sessions are closed first).
SHUTDOWN_SECONDS: Final = 5.0
#: WebSocket pings keep idle sessions through NATs and notice vanished clients.
HEARTBEAT_SECONDS: Final = 30.0


def console_path(namespace: str, name: str) -> str:
    return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/virtualmachines/{name}/console"


@dataclass(frozen=True)
class ConsoleAddress:
    """Where this agent serves consoles, as written into its VMs' status."""

    base_url: str  # wss://host:port
    certificate_sha256: str

    def endpoint(self, namespace: str, name: str) -> ConsoleEndpoint:
        return ConsoleEndpoint(
            url=self.base_url + console_path(namespace, name),
            certificate_sha256=self.certificate_sha256,
        )


def refusal(status: int, message: str) -> web.Response:
    """A Kubernetes ``Status`` body (for curl) with the message also in a header
    (a WebSocket client sees only the status line and headers of a refused upgrade)."""
    said = "".join(c if c.isprintable() and c.isascii() else " " for c in message)[:1000]
    return web.json_response(
        status_body(status, message), status=status, headers={MESSAGE_HEADER: said}
    )


def status_body(status: int, message: str) -> dict[str, Any]:
    """A Kubernetes ``Status``, so clients print what kubectl would."""
    reasons = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        429: "TooManyRequests",
    }
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reasons.get(status, "ServiceUnavailable"),
        "code": status,
    }


class ConsoleServer:
    def __init__(
        self, node: str, listen: str, advertise: str | None, hv: Hypervisor, kube: Any
    ) -> None:
        self.node = node
        self.host, self.port = split_listen(listen)
        self.advertise = advertise or self.host
        if self.advertise in ("0.0.0.0", "::", ""):
            raise ValueError("--console-listen on every address needs --console-advertise")
        self.hv = hv
        #: The reviews' own client (a flood of callers cannot queue the agent's work).
        self.kube = kube
        self.log = get_logger("virtfleet.agent.console", node=node)
        self.reviews = ReviewCache()
        self._reviewing = asyncio.Semaphore(MAX_REVIEWS)
        self._sessions: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self.certificate: ServingCertificate | None = None

    async def start(self) -> ConsoleAddress:
        self.certificate = make_certificate(self.advertise, self.node)
        context = server_context(self.certificate, await self._client_ca())
        app = web.Application()
        app.router.add_get(console_path("{namespace}", "{name}"), self._handle, allow_head=False)
        app.on_shutdown.append(self._close_sessions)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=context).start()
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        address = ConsoleAddress(f"wss://{host}:{self.port}", self.certificate.sha256)
        self.log.info("console endpoint serving", url=address.base_url)
        return address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _close_sessions(self, _app: web.Application) -> None:
        """The agent stops: sessions end now (the client says so), not at the grace's end."""
        for ws in list(self._sessions):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the node agent stops")

    async def _client_ca(self) -> str | None:
        """The cluster's client CA, which the apiserver publishes for extension servers."""
        try:
            body = await self.kube.request("GET", CLIENT_CA_CONFIGMAP)
        except KubeError as exc:
            self.log.warning("client certificates not accepted (tokens only)", error=str(exc))
            return None
        ca = ((body or {}).get("data") or {}).get("client-ca-file")
        if not ca:
            self.log.warning("client certificates not accepted: the cluster publishes no CA")
        return str(ca) if ca else None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        log = self.log.bind(namespace=namespace, vm=name)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=MAX_FRAME)
        if not ws.can_prepare(request).ok:
            return refusal(400, "a console is a WebSocket: use `virtfleet console`")
        try:
            check_namespace(namespace)
            check_name(name)
        except InvalidInputError as exc:
            return refusal(400, str(exc))
        try:
            caller = await self._review(request, namespace, name)
        except AccessRefusedError as exc:
            log.info("console refused", status=exc.status, reason=exc.message)
            return refusal(exc.status, exc.message)
        try:
            guest = await self.hv.lookup_by_name(domain_name(namespace, name))
            ours = guest is not None and owned_by(await guest.xml(), namespace, name)
        except hv_errors.HypervisorError as exc:
            return refusal(503, f"libvirt on node {self.node} did not answer: {exc}")
        if guest is None or not ours:
            message = f"VirtualMachine {namespace}/{name} has no domain on node {self.node}"
            return refusal(404, message)
        try:
            console = await open_console(guest)
        except hv_errors.HypervisorError as exc:
            message = f"VirtualMachine {namespace}/{name}: no console: {exc}"
            return refusal(409, message)
        self._sessions.add(ws)
        try:
            await ws.prepare(request)
            log.info("console opened", user=caller.username, via=caller.via)
            await _relay(ws, console, log)
        finally:
            self._sessions.discard(ws)
            await console.close()
            if ws.prepared:
                await ws.close()
            log.info("console closed", user=caller.username, dropped_bytes=console.dropped)
        return ws

    async def _review(self, request: web.Request, namespace: str, name: str) -> Caller:
        """Authenticate and authorise, a few callers at a time (busy: 429 at once)."""
        if self._reviewing.locked():
            raise AccessRefusedError(429, "too many console requests at once; try again")
        async with self._reviewing:
            peercert = request.transport.get_extra_info("peercert") if request.transport else None
            caller = await authenticate(
                self.kube, request.headers.get("Authorization"), peercert, self.reviews
            )
            await authorize(self.kube, caller, namespace, name)
            return caller


async def _relay(ws: web.WebSocketResponse, console: ConsoleStream, log: Any) -> None:
    """Bytes both ways until either side ends (or fails: logged, the session is over)."""

    async def guest_to_client() -> None:
        while data := await console.read():
            await ws.send_bytes(data)

    async def client_to_guest() -> None:
        async for message in ws:
            if message.type is WSMsgType.BINARY:
                await console.write(message.data)
            elif message.type is WSMsgType.TEXT:
                await console.write(message.data.encode())
            else:
                return

    tasks = [asyncio.create_task(guest_to_client()), asyncio.create_task(client_to_guest())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.info("console relay ended by an error", error=repr(result))
