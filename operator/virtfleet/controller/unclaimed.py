"""VMSnapshots and VMRestores that no agent looks at yet: their VM is missing or unplaced.

Agents own snapshots and restores of the VMs placed on their node. Before a VM has a
node — or when it does not exist, as when Git applies a snapshot before its VM, or the
VM was deleted before anything was placed — nobody would write a status, and the object
would sit there with none. The controller, which sees the whole fleet, says why it
waits (``Pending``, ``Ready=False`` with ``VMNotFound`` or ``WaitingForPlacement``) and
fails a snapshot at its ``failureDeadline`` (pure decisions in
:mod:`virtfleet.reconcile.unclaimed`). Writes carry a resourceVersion precondition, so a
controller decision never overwrites what an agent wrote meanwhile; once the object is
labelled for a node, or its VM is placed, the controller leaves it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from virtfleet.api.snapshot import VMRestoreSpec, VMRestoreStatus, VMSnapshotSpec, VMSnapshotStatus
from virtfleet.controller.cache import FleetCache
from virtfleet.identity import NODE_LABEL
from virtfleet.logs import get_logger
from virtfleet.reconcile.snapshot_types import WAIT_SECONDS, RestoreView, SnapshotView
from virtfleet.reconcile.unclaimed import (
    VmPresence,
    unclaimed_restore_status,
    unclaimed_snapshot_status,
)
from virtfleet.reconcile.views import parse_time
from virtfleet.runtime.kube import Conflict, KubeApi, NotFound
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest

SNAPSHOT = "VMSnapshot"
RESTORE = "VMRestore"
#: (kind, namespace, name)
UnclaimedKey = tuple[str, str, str]


def _spec_vm_name(body: Mapping[str, Any]) -> str:
    return str((body.get("spec") or {}).get("vmName") or "")


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "namespace": str(meta["namespace"]),
        "name": str(meta["name"]),
        "uid": str(meta.get("uid") or ""),
        "generation": int(meta.get("generation") or 1),
        "created": parse_time(meta.get("creationTimestamp")) or datetime.now(UTC),
    }


def snapshot_view(body: Mapping[str, Any]) -> SnapshotView:
    try:
        spec: VMSnapshotSpec | None = VMSnapshotSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        spec = None  # the schema refuses it at apply time; nothing to say here
    return SnapshotView(
        **_common(body),
        spec=spec,
        status=VMSnapshotStatus.model_validate(body.get("status") or {}),
        deleting=bool(body["metadata"].get("deletionTimestamp")),
    )


def restore_view(body: Mapping[str, Any]) -> RestoreView:
    try:
        spec: VMRestoreSpec | None = VMRestoreSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        spec = None
    return RestoreView(
        **_common(body),
        spec=spec,
        status=VMRestoreStatus.model_validate(body.get("status") or {}),
    )


class UnclaimedWatcher:
    """Status of unclaimed snapshots and restores, inside one controller.

    Given the controller's fleet cache, API client and clock (not the controller), so
    this module does not depend on the one that owns it.
    """

    def __init__(self, fleet: FleetCache, kube: KubeApi, clock: Callable[[], datetime]) -> None:
        self.fleet = fleet
        self.kube = kube
        self.clock = clock
        self.cache: dict[UnclaimedKey, dict[str, Any]] = {}
        self.queue: WorkQueue[UnclaimedKey] = WorkQueue(name="unclaimed", workers=2)
        self.log = get_logger("virtfleet.controller.unclaimed")

    def event(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key: UnclaimedKey = (kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        from_backup = kind == RESTORE and bool((body.get("spec") or {}).get("backupName"))
        if event_type == "DELETED" or (meta.get("labels") or {}).get(NODE_LABEL) or from_backup:
            # (A restore from a backup creates its VM: controller.backups speaks for it.)
            # Gone, or claimed by an agent for good: nothing for the controller to say.
            self.cache.pop(key, None)
            self.queue.forget(key)
            return
        store_newest(self.cache, key, body)
        self.queue.add(key)

    def vm_changed(self, namespace: str, vm_name: str) -> None:
        """A VM appeared, moved or went: the objects naming it may need another word."""
        for key, body in self.cache.items():
            if key[1] == namespace and _spec_vm_name(body) == vm_name:
                self.queue.add(key)

    def resync(self) -> None:
        for key in list(self.cache):
            self.queue.add(key)

    def presence(self, namespace: str, vm_name: str) -> VmPresence:
        vm = self.fleet.vms.get((namespace, vm_name))
        if vm is None or (vm.deleting and vm.node_name is None):
            return VmPresence.MISSING
        return VmPresence.UNPLACED if vm.node_name is None else VmPresence.PLACED

    async def reconcile(self, key: UnclaimedKey) -> float | None:
        body = self.cache.get(key)
        if body is None:
            return None
        kind, namespace, name = key
        presence = self.presence(namespace, _spec_vm_name(body))
        now = self.clock()
        wanted: VMSnapshotStatus | VMRestoreStatus | None
        if kind == SNAPSHOT:
            wanted = unclaimed_snapshot_status(snapshot_view(body), presence, now)
        else:
            wanted = unclaimed_restore_status(restore_view(body), presence, now)
        if wanted is None:
            return None
        patch = status_patch(body.get("status"), wanted.to_wire())
        again = WAIT_SECONDS if (body.get("spec") or {}).get("failureDeadline") else None
        if patch is None:
            return again  # only a deadline can change the answer without an event
        try:
            updated = await self.kube.patch_status(
                kind,
                namespace,
                name,
                patch,
                resource_version=str(body["metadata"].get("resourceVersion")),
            )
        except Conflict:
            return 1.0  # an agent (or the user) wrote meanwhile: decide again on the newer
        except NotFound:
            return None
        self.log.info(
            "unclaimed object waits",
            kind=kind,
            namespace=namespace,
            name=name,
            phase=(updated.get("status") or {}).get("phase"),
        )
        store_newest(self.cache, key, updated, cached_only=True)
        return again
