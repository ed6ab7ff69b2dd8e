"""The thin async client for the Kubernetes calls virtfleet makes outside kopf.

:class:`KubeClient` implements :class:`~virtfleet.runtime.kubeapi.KubeApi` (the protocol
everything else types against) on an aiohttp session of its own, from the same
credentials as kopf's (:mod:`virtfleet.runtime.credentials`). Every call is one REST
request on a generic path, so custom and core kinds share one code path, and errors
arrive as the protocol's small hierarchy (:class:`NotFound`, :class:`Conflict`,
:class:`Forbidden`, :class:`Invalid`, :class:`ApiUnavailable`), re-exported here.

It used to wrap the official client, whose calls block, on a thread pool: that cost
the agent the official client's ~18 MiB of generated models, a thread per request in
flight and a hop to and from the event loop for each.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp
import kopf

from virtfleet.api.conditions import now_rfc3339
from virtfleet.logs import get_logger
from virtfleet.runtime import discovery
from virtfleet.runtime.credentials import client_session, load_connection
from virtfleet.runtime.kubeapi import (
    DEFAULT_EVENT_NAMESPACE,
    ApiUnavailable,
    Conflict,
    Forbidden,
    Invalid,
    KindLike,
    KubeApi,
    KubeError,
    NotFound,
    api_kind,
    error_for_status,
    nsname,
    object_ref,
    secret_value,
)
from virtfleet.runtime.locks import KeyedLocks
from virtfleet.runtime.useragent import user_agent

# The protocol and its errors, for the callers that build a client and catch what it raises.
__all__ = [
    "ApiUnavailable",
    "Conflict",
    "Forbidden",
    "Invalid",
    "KubeApi",
    "KubeClient",
    "KubeError",
    "NotFound",
    "load_connection",
    "secret_value",
]

_log = get_logger("virtfleet.runtime.kube")

# --- Events ---------------------------------------------------------------------------


def event_key(
    ref: Mapping[str, str], type: str, reason: str, message: str, component: str
) -> tuple[str, str]:
    """``(namespace, name)`` of the Event: derived from what aggregates, so a restarted
    process finds and bumps the same Event instead of creating another."""
    namespace = ref.get("namespace") or DEFAULT_EVENT_NAMESPACE
    fields = (
        ref.get("uid", ""),
        ref.get("kind", ""),
        ref.get("name", ""),
        type,
        reason,
        message,
        component,
    )
    digest = hashlib.sha256("\x00".join(fields).encode()).hexdigest()[:16]
    return namespace, f"{ref.get('name', 'object')[:200]}.{digest}"


def event_body(
    key: tuple[str, str],
    ref: Mapping[str, str],
    type: str,
    reason: str,
    message: str,
    component: str,
    now: str,
) -> dict[str, Any]:
    """A new core/v1 Event (count 1)."""
    namespace, name = key
    return {
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": dict(ref),
        "type": type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": os.environ.get("HOSTNAME", component)[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


# --- the client -----------------------------------------------------------------------


class KubeClient:
    """Async facade over the official client (see the module doc for the why)."""

    def __init__(
        self,
        connection: kopf.ConnectionInfo | None = None,
        *,
        max_workers: int = 8,
        request_timeout: float = 30.0,
        field_manager: str = "virtfleet",
        event_cache_size: int = 4096,
    ) -> None:
        #: None: :func:`load_connection` on first use (and again after a 401: a service
        #: account's token is rotated on disk).
        self._connection = connection
        self._reload_credentials = connection is None
        #: Requests in flight at most (the connection pool's size); the rest wait.
        self._max_connections = max_workers
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self.field_manager = field_manager
        #: Told ``(verb, resource, code)`` after every request (metrics; 0: no answer).
        self.observer: Callable[[str, str, int], None] | None = None
        # Event aggregation: (namespace, event name) → count, like client-go's correlator.
        self._events: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._event_cache_size = event_cache_size
        self._event_locks: KeyedLocks[tuple[str, str]] = KeyedLocks()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- transport ---------------------------------------------------------------------

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use (it must be made inside the running loop)."""
        if self._session is None:
            if self._connection is None:
                self._connection = load_connection()
            self._session = client_session(
                self._connection,
                limit=self._max_connections,
                headers={"Accept": "application/json", "User-Agent": user_agent()},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        return self._session

    async def _reopen_with_new_credentials(self) -> bool:
        """After a 401: read the credentials again (a rotated token). False when they
        were given, not loaded, so there is nothing newer to read."""
        if not self._reload_credentials:
            return False
        await self.close()
        self._connection = None
        return True

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        what: str = "",
    ) -> Any:
        """One REST call; returns the decoded JSON body or raises a :class:`KubeError`."""
        url = path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if method in ("PATCH", "POST", "PUT"):
            params.setdefault("fieldManager", self.field_manager)
        if params:
            url += "?" + urlencode(params)
        what = what or f"{method} {path}"
        data = None if body is None else json.dumps(body).encode()
        code = 0
        try:
            status, raw = await self._send(method, url, data, content_type, what)
            if status == 401 and await self._reopen_with_new_credentials():
                status, raw = await self._send(method, url, data, content_type, what)
            code = status
            if not 200 <= status < 300:
                raise error_for_status(status, raw, what)
            return json.loads(raw) if raw else None
        finally:
            if self.observer is not None:
                self.observer(method, resource_of(path), code)

    async def _send(
        self, method: str, url: str, data: bytes | None, content_type: str, what: str
    ) -> tuple[int, bytes]:
        session = self._open()
        assert self._connection is not None
        headers = {"Content-Type": content_type} if data is not None else None
        try:
            async with session.request(
                method, self._connection.server.rstrip("/") + url, data=data, headers=headers
            ) as response:
                return response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ApiUnavailable(f"{what}: {str(exc) or type(exc).__name__}") from exc

    # --- generic objects -----------------------------------------------------------------

    async def get(self, kind: KindLike, namespace: str | None, name: str) -> dict[str, Any]:
        ak = api_kind(kind)
        result: dict[str, Any] = await self.request(
            "GET", ak.path(namespace, name), what=f"get {ak.kind} {nsname(namespace, name)}"
        )
        return result

    async def list(
        self,
        kind: KindLike,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """All objects of ``kind`` (in ``namespace``, or everywhere), following pagination.

        A label-selected list (a node's own VMs among a fleet's) is asked in one page: a
        paginated list is read from etcd, every object of the kind decoded to find the
        matches, while an unpaginated one is a consistent read from the apiserver's watch
        cache (Kubernetes ≥ 1.31), filtered in memory — O(matches) of work per agent,
        not O(fleet).
        """
        ak = api_kind(kind)
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            query = {
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
                "limit": None if label_selector else "500",
                "continue": token,
            }
            page = await self.request(
                "GET",
                ak.path(namespace),
                query={k: v for k, v in query.items() if v},
                what=f"list {ak.plural}",
            )
            for item in page.get("items", []):
                item.setdefault("apiVersion", ak.api_version)
                item.setdefault("kind", ak.kind)
                items.append(item)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def create(self, kind: KindLike, body: Mapping[str, Any]) -> dict[str, Any]:
        ak = api_kind(kind)
        namespace = body.get("metadata", {}).get("namespace")
        result: dict[str, Any] = await self.request(
            "POST",
            ak.path(namespace),
            body={"apiVersion": ak.api_version, "kind": ak.kind, **body},
            what=f"create {ak.kind} {nsname(namespace, body.get('metadata', {}).get('name'))}",
        )
        return result

    async def delete(self, kind: KindLike, namespace: str | None, name: str) -> None:
        ak = api_kind(kind)
        await self.request(
            "DELETE", ak.path(namespace, name), what=f"delete {ak.kind} {nsname(namespace, name)}"
        )

    async def patch(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386); ``None`` values delete keys."""
        ak = api_kind(kind)
        path = ak.path(namespace, name) + (f"/{subresource}" if subresource else "")
        result: dict[str, Any] = await self.request(
            "PATCH",
            path,
            body=dict(patch),
            content_type="application/merge-patch+json",
            what=f"patch {ak.kind} {nsname(namespace, name)}"
            + (f" {subresource}" if subresource else ""),
        )
        return result

    async def patch_status(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch the status subresource with ``{"status": patch}``.

        ``resource_version`` turns the write into a compare-and-swap (409 → :class:`Conflict`
        when the object changed since it was read), for decisions that must not race.
        """
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.patch(kind, namespace, name, body, subresource="status")

    async def patch_metadata(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        *,
        labels: Mapping[str, str | None] | None = None,
        annotations: Mapping[str, str | None] | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch labels/annotations; a ``None`` value deletes that key."""
        metadata: dict[str, Any] = {}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return await self.patch(kind, namespace, name, {"metadata": metadata})

    # --- discovery -----------------------------------------------------------------------

    async def wait_until_served(self, interval: float = 1.0, log_every: float = 10.0) -> None:
        """Return once API discovery lists every virtfleet kind (:mod:`.discovery`)."""
        await discovery.wait_until_served(self.request, interval=interval, log_every=log_every)

    # --- VMHost --------------------------------------------------------------------------

    async def upsert_vmhost_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``status`` into VMHost ``name``, creating the (cluster-scoped) object first
        if it is missing. One request in the steady state; two or three on first start."""
        try:
            return await self.patch_status("VMHost", None, name, status)
        except NotFound:
            pass
        with contextlib.suppress(Conflict):  # created concurrently: fine, it exists now
            await self.create("VMHost", {"metadata": {"name": name}, "spec": {}})
        return await self.patch_status("VMHost", None, name, status)

    # --- core helpers --------------------------------------------------------------------

    async def get_secret_key(self, namespace: str, name: str, key: str) -> bytes:
        """The decoded value of ``key`` in Secret ``namespace/name``."""
        return secret_value(await self.get("Secret", namespace, name), key)

    async def list_nodes(self, label_selector: str | None = None) -> builtins.list[dict[str, Any]]:
        return await self.list("Node", label_selector=label_selector)

    async def get_node(self, name: str) -> dict[str, Any]:
        return await self.get("Node", None, name)

    # --- Events --------------------------------------------------------------------------

    async def record_event(
        self,
        obj_ref: Mapping[str, Any],
        type: str,
        reason: str,
        message: str,
        component: str,
    ) -> None:
        """Record a core/v1 Event about ``obj_ref`` (an object body or an ObjectReference).

        Repeats aggregate the way client-go's EventRecorder does: the same object, type,
        reason, message and component bump ``count`` and ``lastTimestamp`` of one Event
        instead of creating another. The Event's name is derived from those fields, so
        the aggregation also survives a restart (a create that finds it existing bumps it).
        Events are best effort: a failure is logged, never raised.
        """
        ref = object_ref(obj_ref)
        key = event_key(ref, type, reason, message, component)
        try:
            async with self._event_locks.lock(key):
                await self._record_event(key, ref, type, reason, message, component)
        except KubeError as exc:
            _log.warning("could not record an event", reason=reason, error=str(exc))

    async def _record_event(
        self,
        key: tuple[str, str],
        ref: dict[str, str],
        type: str,
        reason: str,
        message: str,
        component: str,
    ) -> None:
        namespace, name = key
        now = now_rfc3339()
        count = self._events.get(key)
        if count is not None:
            try:
                await self.patch(
                    "Event", namespace, name, {"count": count + 1, "lastTimestamp": now}
                )
                self._remember_event(key, count + 1)
                return
            except NotFound:
                pass  # expired (events have a TTL): start a new one
        event = event_body(key, ref, type, reason, message, component, now)
        try:
            await self.create("Event", event)
            self._remember_event(key, 1)
        except Conflict:
            existing = await self.get("Event", namespace, name)
            count = int(existing.get("count") or 1) + 1
            await self.patch("Event", namespace, name, {"count": count, "lastTimestamp": now})
            self._remember_event(key, count)

    def _remember_event(self, key: tuple[str, str], count: int) -> None:
        self._events[key] = count
        self._events.move_to_end(key)
        while len(self._events) > self._event_cache_size:
            self._events.popitem(last=False)

    def bookkeeping(self) -> dict[str, int]:
        """Event locks held (0 when idle) and aggregated Events (bounded by the cache size)."""
        return {"event_locks": len(self._event_locks), "events_aggregated": len(self._events)}


def resource_of(path: str) -> str:
    """The resource a REST path names, as a bounded label: ``virtualmachines/status``,
    ``events``, ``tokenreviews`` (never a namespace or an object name)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    if len(parts) >= 3 and parts[0] == "namespaces":
        parts = parts[2:]
    if not parts:
        return ""
    resource = parts[0]
    return f"{resource}/{parts[2]}" if len(parts) >= 3 else resource
