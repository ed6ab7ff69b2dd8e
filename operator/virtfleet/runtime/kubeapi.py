"""What virtfleet asks of the Kubernetes API outside kopf: the :class:`KubeApi` protocol.

kopf owns the watches; everything the operators *write* (status, labels, Events, VMHost)
and the few reads they make go through an object of this protocol. The real one is
:class:`virtfleet.runtime.kube.KubeClient`; the tests use an in-memory one
(``testkit.kube.FakeKube``). Both speak the same small error hierarchy the reconcilers
act on (:class:`NotFound`, :class:`Conflict`, :class:`Forbidden`, :class:`Invalid`,
:class:`ApiUnavailable`), and the same kinds (:func:`api_kind`).
"""

from __future__ import annotations

import base64
import builtins
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote

from virtfleet.api.resources import KINDS, Kind
from virtfleet.identity import API_GROUP, API_VERSION

#: Namespace of Events about cluster-scoped objects (where kubectl describe looks).
DEFAULT_EVENT_NAMESPACE = "default"
EventType = Literal["Normal", "Warning"]


# --- errors ---------------------------------------------------------------------------


class KubeError(Exception):
    """A failed API call; ``status`` is the HTTP status (0 when none came back)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(KubeError):  # noqa: N818 - Kubernetes' own names
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):  # noqa: N818 - Kubernetes' own names
    """409: a resourceVersion precondition failed, or the object already exists."""


class Forbidden(KubeError):  # noqa: N818 - Kubernetes' own names
    """401/403: RBAC does not allow it; retrying will not help until RBAC changes."""


class Invalid(KubeError):  # noqa: N818 - Kubernetes' own names
    """400/422: the apiserver refused the content (schema, CEL, immutable field)."""


class ApiUnavailable(KubeError):  # noqa: N818 - Kubernetes' own names
    """5xx, 429, timeouts, refused connections: transient, retry with backoff."""


def error_for_status(status: int, body: bytes | str | None, what: str) -> KubeError:
    """The error for an HTTP ``status`` and its (Status object) ``body``."""
    message, reason = what, ""
    if body:
        try:
            parsed = json.loads(body)
            message = f"{what}: {parsed.get('message') or parsed}"
            reason = str(parsed.get("reason") or "")
        except (ValueError, AttributeError):
            text = body.decode(errors="replace") if isinstance(body, bytes) else body
            message = f"{what}: {text[:500]}"
    cls: type[KubeError]
    if status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status in (401, 403):
        cls = Forbidden
    elif status in (400, 422):
        cls = Invalid
    elif status == 429 or status >= 500 or status == 0:
        cls = ApiUnavailable
    else:
        cls = KubeError
    return cls(message, status=status, reason=reason)


# --- kinds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKind:
    """Where a kind lives in the REST API."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        return base

    @classmethod
    def from_kind(cls, kind: Kind) -> ApiKind:
        return cls(kind.kind, API_GROUP, API_VERSION, kind.plural, kind.namespaced)


CORE_KINDS = (
    ApiKind("Node", "", "v1", "nodes", namespaced=False),
    ApiKind("Namespace", "", "v1", "namespaces", namespaced=False),
    ApiKind("Secret", "", "v1", "secrets", namespaced=True),
    ApiKind("Event", "", "v1", "events", namespaced=True),
    ApiKind("Lease", "coordination.k8s.io", "v1", "leases", namespaced=True),
)
API_KINDS: dict[str, ApiKind] = {
    **{k.kind: k for k in CORE_KINDS},
    **{k.kind: ApiKind.from_kind(k) for k in KINDS},
}

KindLike = str | Kind | ApiKind


def api_kind(kind: KindLike) -> ApiKind:
    """Resolve a kind name (``"VirtualMachine"``, ``"Node"``) or model to its REST location."""
    if isinstance(kind, ApiKind):
        return kind
    if isinstance(kind, Kind):
        return ApiKind.from_kind(kind)
    try:
        return API_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(sorted(API_KINDS))}") from None


def object_ref(obj: Mapping[str, Any]) -> dict[str, str]:
    """An ``ObjectReference`` for an object body (or a reference, returned as is)."""
    if "metadata" not in obj:
        return {k: str(v) for k, v in obj.items() if v is not None}
    meta = obj["metadata"]
    ref = {
        "apiVersion": str(obj.get("apiVersion", "")),
        "kind": str(obj.get("kind", "")),
        "name": str(meta.get("name", "")),
        "namespace": str(meta.get("namespace") or ""),
        "uid": str(meta.get("uid") or ""),
    }
    return {k: v for k, v in ref.items() if v}


def secret_value(secret: Mapping[str, Any], key: str) -> bytes:
    """The decoded value of ``key`` in a Secret object; NotFound when it has no such key."""
    if key in (secret.get("data") or {}):
        return base64.b64decode(secret["data"][key])
    if key in (secret.get("stringData") or {}):  # never stored, but harmless
        return str(secret["stringData"][key]).encode()
    meta = secret.get("metadata") or {}
    raise NotFound(
        f"Secret {nsname(meta.get('namespace'), meta.get('name'))} has no key {key!r}",
        status=404,
    )


def nsname(namespace: str | None, name: str | None) -> str:
    """``namespace/name``, or ``name`` alone for a cluster-scoped object (for messages)."""
    return f"{namespace}/{name}" if namespace else str(name)


# --- the protocol ---------------------------------------------------------------------


class KubeApi(Protocol):
    """The Kubernetes calls virtfleet makes outside kopf (type against this, not a client).

    Objects are plain JSON bodies. Writes are JSON merge patches (RFC 7386: a ``None``
    value deletes a key); a ``resourceVersion`` in a patch's metadata (or the
    ``resource_version`` argument) makes the write a compare-and-swap that raises
    :class:`Conflict` when the object changed since it was read. Failures raise a
    :class:`KubeError` subclass; Events never raise.
    """

    async def close(self) -> None: ...

    async def get(self, kind: KindLike, namespace: str | None, name: str) -> dict[str, Any]:
        """The object, or :class:`NotFound`."""
        ...

    async def list(
        self,
        kind: KindLike,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """All objects of ``kind`` (in ``namespace``, or everywhere) the selectors match."""
        ...

    async def create(self, kind: KindLike, body: Mapping[str, Any]) -> dict[str, Any]:
        """The created object; :class:`Conflict` when one of that name exists."""
        ...

    async def delete(self, kind: KindLike, namespace: str | None, name: str) -> None: ...

    async def patch(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch of the object (or of its ``subresource``); the object after."""
        ...

    async def patch_status(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch the status subresource with ``{"status": patch}``."""
        ...

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
        ...

    async def wait_until_served(self, interval: float = 1.0, log_every: float = 10.0) -> None:
        """Return once API discovery lists every virtfleet kind."""
        ...

    async def upsert_vmhost_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``status`` into VMHost ``name``, creating the object first if it is missing."""
        ...

    async def get_secret_key(self, namespace: str, name: str, key: str) -> bytes:
        """The decoded value of ``key`` in Secret ``namespace/name``."""
        ...

    async def list_nodes(
        self, label_selector: str | None = None
    ) -> builtins.list[dict[str, Any]]: ...

    async def get_node(self, name: str) -> dict[str, Any]: ...

    async def record_event(
        self,
        obj_ref: Mapping[str, Any],
        type: str,
        reason: str,
        message: str,
        component: str,
    ) -> None:
        """Record a core/v1 Event about ``obj_ref`` (an object body or an ObjectReference);
        repeats aggregate into one Event. Best effort: never raises."""
        ...

    def bookkeeping(self) -> dict[str, int]:
        """Per-object state the client holds (``event_locks``: 0 when idle) and its caches."""
        ...
