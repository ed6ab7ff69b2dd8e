"""API writes of the snapshot and restore loops, each keeping the loop's cache current.

One :class:`ObjectStore` per kind (VMSnapshot, VMRestore): metadata (adoption) and
status go through it, so the next pass decides from what was just written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from virtfleet.agent.agent import COMPONENT
from virtfleet.agent.errors import ActionError
from virtfleet.api.backup import VMBackupStatus
from virtfleet.api.snapshot import VMRestoreStatus, VMSnapshotStatus
from virtfleet.identity import API_GROUP, API_VERSION, NODE_LABEL, Key
from virtfleet.reconcile.snapshot_types import Adopt
from virtfleet.reconcile.vm_model import EventNote
from virtfleet.runtime.kube import Conflict, KubeApi, KubeError, NotFound
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest


class ObjectStore:
    """Writes to the objects of one ``kind`` whose bodies ``cache`` holds (not a copy)."""

    def __init__(
        self,
        kube: KubeApi,
        kind: str,
        cache: dict[Key, dict[str, Any]],
        *,
        node: str,
        finalizer: str,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.cache = cache
        self.node = node
        self.finalizer = finalizer
        self.log = log

    async def adopt(self, key: Key, action: Adopt) -> None:
        """ownerReference to the VM, node label, and (snapshots) the node's finalizer.

        Metadata only, with the resourceVersion read, so a concurrent change is never
        overwritten (merge patches replace lists whole).
        """
        body = self.cache.get(key)
        if body is None:
            return
        meta = body["metadata"]
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != action.vm_uid]
        refs.append(
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "VirtualMachine",
                "name": action.vm_name,
                "uid": action.vm_uid,
                "blockOwnerDeletion": False,
            }
        )
        metadata: dict[str, Any] = {
            "ownerReferences": refs,
            "labels": {NODE_LABEL: self.node},
            "resourceVersion": meta.get("resourceVersion"),
        }
        if action.finalizer:
            finalizers = list(meta.get("finalizers") or [])
            if self.finalizer not in finalizers:
                finalizers.append(self.finalizer)
            metadata["finalizers"] = finalizers
        try:
            updated = await self.kube.patch(self.kind, key[0], key[1], {"metadata": metadata})
        except (Conflict, NotFound) as exc:
            raise ActionError("Conflict", str(exc), permanent=False) from exc
        store_newest(self.cache, key, updated)

    async def label_for_node(self, key: Key) -> bool:
        """Claim the object for this node (its label only), with the resourceVersion read:
        False when it changed meanwhile or is gone (the next pass looks again)."""
        body = self.cache.get(key)
        if body is None:
            return False
        try:
            updated = await self.kube.patch_metadata(
                self.kind,
                key[0],
                key[1],
                labels={NODE_LABEL: self.node},
                resource_version=str(body["metadata"].get("resourceVersion")),
            )
        except (Conflict, NotFound) as exc:
            self.log.info("not labelled yet", kind=self.kind, name=key[1], error=str(exc))
            return False
        store_newest(self.cache, key, updated)
        return True

    async def write_status(
        self,
        key: Key,
        body: Mapping[str, Any],
        status: VMSnapshotStatus | VMRestoreStatus | VMBackupStatus,
        *,
        cas: bool = False,
    ) -> bool:
        """Write status if it changed; False when it could not be stored."""
        current = self.cache.get(key, body)
        patch = status_patch(current.get("status"), status.to_wire())
        if patch is None:
            return True
        version = str(current["metadata"].get("resourceVersion")) if cas else None
        try:
            updated = await self.kube.patch_status(
                self.kind, key[0], key[1], patch, resource_version=version
            )
        except Conflict:
            try:
                store_newest(self.cache, key, await self.kube.get(self.kind, key[0], key[1]))
            except KubeError as exc:  # the watch brings the fresh object soon anyway
                self.log.info(
                    "re-read after a conflict failed", kind=self.kind, name=key[1], error=str(exc)
                )
            return False
        except NotFound:
            return False
        store_newest(self.cache, key, updated, cached_only=True)
        return True

    async def record_events(self, body: Mapping[str, Any], events: Iterable[EventNote]) -> None:
        """Kubernetes Events about ``body``: best effort, a failure is logged and dropped."""
        for note in events:
            try:
                await self.kube.record_event(body, note.type, note.reason, note.message, COMPONENT)
            except Exception as exc:
                self.log.info(
                    "event not recorded", kind=self.kind, reason=note.reason, error=str(exc)
                )
