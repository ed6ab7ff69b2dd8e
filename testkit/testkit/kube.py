"""An in-memory :class:`~virtfleet.runtime.kubeapi.KubeApi`: the one fake API of the tests.

It keeps objects in a dict and behaves like the apiserver where the operators' logic can
tell: every write gets a new ``resourceVersion``; a stale one in a patch (or the
``resource_version`` argument) raises :class:`Conflict`, a missing object
:class:`NotFound`, a create of an existing name :class:`Conflict`; patches are JSON
merge patches; kinds with a status subresource (virtfleet's, Node, Namespace) take status
only through it and ignore it elsewhere; a spec change bumps ``generation``; deleting an
object with finalizers marks it (``deletionTimestamp``) and removing its last finalizer
then removes it. Events are recorded, not stored.

What a test looks at:

- ``objects``: the stored bodies themselves (live: a test may edit one to stage a race),
  keyed ``(kind, namespace, name)``, or ``(namespace, name)`` with ``keyed_by_name=True``
  for tests whose objects have distinct names whatever their kind;
- ``calls``: the writes in order, ``("status" | "metadata" | "patch" | "create" |
  "delete", name, what was written)`` (a metadata-only patch is ``"metadata"``, without
  the resourceVersion precondition);
- ``events``: one tuple per :meth:`record_event` call, of the ``event_fields`` of
  :class:`RecordedEvent` (``("name", "reason")`` unless told otherwise); ``recorded``
  has them whole.

:meth:`put` stores an object as if someone else wrote it (no preconditions, not in
``calls``): ``put(kind, body)``, or ``put(body)`` when the body says its ``kind``;
:meth:`delete_now` removes one that way, and :meth:`get_now` reads without awaiting.
"""

from __future__ import annotations

import builtins
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, overload

from virtfleet.api.conditions import rfc3339
from virtfleet.api.resources import KINDS
from virtfleet.runtime.kubeapi import (
    Conflict,
    KindLike,
    NotFound,
    api_kind,
    nsname,
    object_ref,
    secret_value,
)
from virtfleet.runtime.status import apply_merge_patch

Body = dict[str, Any]
Key = tuple[str, ...]

#: Kinds whose status is written through the status subresource only.
STATUS_SUBRESOURCE = frozenset({k.kind for k in KINDS} | {"Node", "Namespace"})


@dataclass(frozen=True)
class RecordedEvent:
    """One :meth:`FakeKube.record_event` call."""

    kind: str
    namespace: str
    name: str
    type: str
    reason: str
    message: str
    component: str


def _utcnow() -> datetime:
    return datetime.now(UTC)


class FakeKube:
    """The in-memory API (see the module doc for what it does and what a test sees)."""

    def __init__(
        self,
        *,
        keyed_by_name: bool = False,
        event_fields: Sequence[str] = ("name", "reason"),
        clock: Callable[[], datetime] = _utcnow,
        objects: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
    ) -> None:
        """``objects``: bodies to :meth:`put` first, by kind."""
        self.keyed_by_name = keyed_by_name
        self.event_fields = tuple(event_fields)
        self.clock = clock
        self.objects: dict[Key, Body] = {}
        self.calls: list[tuple[str, str, Body]] = []
        self.recorded: list[RecordedEvent] = []
        self.version = 100
        self._uids = 0
        for kind, bodies in (objects or {}).items():
            for body in bodies:
                self.put(kind, body)

    # --- what a test sees and stages ---------------------------------------------------

    @property
    def events(self) -> list[tuple[str, ...]]:
        return [tuple(str(getattr(e, f)) for f in self.event_fields) for e in self.recorded]

    def key(self, kind: KindLike, namespace: str | None, name: str) -> Key:
        ak = api_kind(kind)
        ns = (namespace or "") if ak.namespaced else ""
        return (ns, name) if self.keyed_by_name else (ak.kind, ns, name)

    @overload
    def put(self, kind: KindLike, body: Mapping[str, Any], /) -> Body: ...

    @overload
    def put(self, body: Mapping[str, Any], /) -> Body: ...

    def put(self, *args: Any) -> Body:
        """Store a body as written by someone else (a new resourceVersion); a copy back.

        ``put(kind, body)``, or ``put(body)`` for a body that says its ``kind``.
        """
        kind, body = args if len(args) == 2 else (args[0]["kind"], args[0])
        ak = api_kind(kind)
        obj = copy.deepcopy(dict(body))
        obj.update(apiVersion=ak.api_version, kind=ak.kind)
        meta = obj.setdefault("metadata", {})
        self._bump(obj)
        self.objects[self.key(ak, meta.get("namespace"), meta["name"])] = obj
        return copy.deepcopy(obj)

    def get_now(self, kind: KindLike, namespace: str | None, name: str) -> Body:
        """:meth:`get` without awaiting: a copy of the stored object, or :class:`NotFound`."""
        return copy.deepcopy(self._stored(kind, namespace, name))

    def delete_now(self, kind: KindLike, namespace: str | None, name: str) -> None:
        """Remove an object outright, as if someone else deleted it (finalizers or not)."""
        self._stored(kind, namespace, name)
        del self.objects[self.key(kind, namespace, name)]

    # --- reads -------------------------------------------------------------------------

    async def get(self, kind: KindLike, namespace: str | None, name: str) -> Body:
        return copy.deepcopy(self._stored(kind, namespace, name))

    async def list(
        self,
        kind: KindLike,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[Body]:
        ak = api_kind(kind)
        return [
            copy.deepcopy(body)
            for body in self.objects.values()
            if body.get("kind") == ak.kind
            and (namespace is None or not ak.namespaced or _meta(body, "namespace") == namespace)
            and _labels_match(body, label_selector)
            and _fields_match(body, field_selector)
        ]

    async def get_secret_key(self, namespace: str, name: str, key: str) -> bytes:
        return secret_value(await self.get("Secret", namespace, name), key)

    async def list_nodes(self, label_selector: str | None = None) -> builtins.list[Body]:
        return await self.list("Node", label_selector=label_selector)

    async def get_node(self, name: str) -> Body:
        return await self.get("Node", None, name)

    async def wait_until_served(self, interval: float = 1.0, log_every: float = 10.0) -> None:
        return None

    # --- writes ------------------------------------------------------------------------

    async def create(self, kind: KindLike, body: Mapping[str, Any]) -> Body:
        ak = api_kind(kind)
        meta = body.get("metadata") or {}
        key = self.key(ak, meta.get("namespace"), meta["name"])
        if key in self.objects:
            raise Conflict(
                f"{ak.kind} {nsname(meta.get('namespace'), meta['name'])} already exists",
                status=409,
                reason="AlreadyExists",
            )
        self.calls.append(("create", str(meta["name"]), copy.deepcopy(dict(body))))
        obj = copy.deepcopy(dict(body))
        obj.update(apiVersion=ak.api_version, kind=ak.kind)
        stored = obj.setdefault("metadata", {})
        self._uids += 1
        stored.setdefault("uid", f"00000000-0000-4000-8000-{self._uids:012d}")
        stored.setdefault("generation", 1)
        stored["creationTimestamp"] = rfc3339(self.clock())
        self._bump(obj)
        self.objects[key] = obj
        return copy.deepcopy(obj)

    async def delete(self, kind: KindLike, namespace: str | None, name: str) -> None:
        obj = copy.deepcopy(self._stored(kind, namespace, name))
        self.calls.append(("delete", name, {}))
        key = self.key(kind, namespace, name)
        if obj["metadata"].get("finalizers"):  # marked; gone with its last finalizer
            obj["metadata"].setdefault("deletionTimestamp", rfc3339(self.clock()))
            self._bump(obj)
            self.objects[key] = obj
        else:
            del self.objects[key]

    async def patch(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> Body:
        ak = api_kind(kind)
        obj = self._stored(ak, namespace, name)
        change = copy.deepcopy(dict(patch))
        expected = (change.get("metadata") or {}).pop("resourceVersion", None)
        if change.get("metadata") == {}:
            del change["metadata"]
        if expected is not None and expected != obj["metadata"].get("resourceVersion"):
            raise Conflict(
                f"{ak.kind} {nsname(namespace, name)}: the object has been modified",
                status=409,
                reason="Conflict",
            )
        if subresource == "status":
            change = {"status": change.get("status") or {}}
            self.calls.append(("status", name, copy.deepcopy(change["status"])))
        elif subresource is not None:
            raise NotFound(f"{ak.kind} has no {subresource!r} subresource here", status=404)
        else:
            if ak.kind in STATUS_SUBRESOURCE:
                change.pop("status", None)
            if set(change) == {"metadata"}:
                self.calls.append(("metadata", name, copy.deepcopy(change["metadata"])))
            else:
                self.calls.append(("patch", name, copy.deepcopy(change)))
        updated: Body = apply_merge_patch(copy.deepcopy(obj), change)  # shares nothing
        if subresource is None and updated.get("spec") != obj.get("spec"):
            updated["metadata"]["generation"] = int(obj["metadata"].get("generation") or 0) + 1
        self._bump(updated)
        key = self.key(ak, namespace, name)
        meta = updated["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[key]  # its last finalizer went: the apiserver removes it
        else:
            self.objects[key] = updated
        return copy.deepcopy(updated)

    async def patch_status(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> Body:
        body: Body = {"status": dict(patch)}
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
    ) -> Body:
        metadata: Body = {}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return await self.patch(kind, namespace, name, {"metadata": metadata})

    async def upsert_vmhost_status(self, name: str, status: Mapping[str, Any]) -> Body:
        try:
            return await self.patch_status("VMHost", None, name, status)
        except NotFound:
            await self.create("VMHost", {"metadata": {"name": name}, "spec": {}})
        return await self.patch_status("VMHost", None, name, status)

    # --- events and the rest -----------------------------------------------------------

    async def record_event(
        self,
        obj_ref: Mapping[str, Any],
        type: str,
        reason: str,
        message: str,
        component: str,
    ) -> None:
        ref = object_ref(obj_ref)
        self.recorded.append(
            RecordedEvent(
                kind=ref.get("kind", ""),
                namespace=ref.get("namespace", ""),
                name=ref.get("name", ""),
                type=type,
                reason=reason,
                message=message,
                component=component,
            )
        )

    def bookkeeping(self) -> dict[str, int]:
        return {"event_locks": 0}

    async def close(self) -> None:
        return None

    # --- internals ---------------------------------------------------------------------

    def _stored(self, kind: KindLike, namespace: str | None, name: str) -> Body:
        try:
            return self.objects[self.key(kind, namespace, name)]
        except KeyError:
            ak = api_kind(kind)
            raise NotFound(f"{ak.kind} {nsname(namespace, name)} not found", status=404) from None

    def _bump(self, obj: Body) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)


def _meta(body: Mapping[str, Any], field: str) -> Any:
    return (body.get("metadata") or {}).get(field)


def _labels_match(body: Mapping[str, Any], selector: str | None) -> bool:
    """Equality-based selectors (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``), comma-joined."""
    labels = _meta(body, "labels") or {}
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            name, value = term.split("!=", 1)
            ok = labels.get(name.strip()) != value.strip()
        elif "=" in term:
            name, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(name.strip()) == value.strip()
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        elif " in " in term or " notin " in term:
            raise ValueError(f"the fake API has no set-based selectors: {term!r}")
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def _fields_match(body: Mapping[str, Any], selector: str | None) -> bool:
    """``metadata.name`` and ``metadata.namespace`` equality, comma-joined."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        field, _, value = term.replace("==", "=").partition("=")
        if field not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"the fake API selects on metadata.name/namespace only: {term!r}")
        if _meta(body, field.split(".", 1)[1]) != value:
            return False
    return True
