"""SnapshotAgent: what the VMSnapshot and VMRestore loops share, and its kopf wiring.

It keeps the caches and queues, turns watch events into queued keys, takes the VM's
lock around each reconcile and hands it to :class:`~.snapshots.SnapshotLoop` or
:class:`~.restores.RestoreLoop` (the package doc says who acts on what).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from virtfleet.agent.agent import COMPONENT, Agent, key_of
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.settings import DELETE_WAIT_SECONDS, AgentSettings
from virtfleet.agent.snapshot.domain import observe_domain
from virtfleet.agent.snapshot.restores import RestoreLoop
from virtfleet.agent.snapshot.snapshots import SnapshotLoop
from virtfleet.agent.snapshot.store import ObjectStore
from virtfleet.agent.snapshot.views import newer
from virtfleet.api.snapshot import RestorePhase
from virtfleet.hypervisor import Guest
from virtfleet.identity import API_GROUP, API_VERSION, NODE_LABEL, Key
from virtfleet.logs import get_logger
from virtfleet.reconcile.snapshot_types import DomainFacts
from virtfleet.runtime.failures import cache_reporter, error_reporter
from virtfleet.runtime.queue import WorkQueue

#: A snapshot whose VM's lock is taken looks again this soon.
BUSY_RETRY_SECONDS = 0.5


class SnapshotAgent:
    """VMSnapshot and VMRestore handling of one node agent (see the module doc)."""

    def __init__(self, agent: Agent, locks: VmLocks) -> None:
        self.agent = agent
        self.locks = locks
        self.hv = agent.hv
        self.kube = agent.kube
        self.settings = agent.settings
        self.node = agent.settings.node_name
        self.snapshots: dict[Key, dict[str, Any]] = {}
        self.restores: dict[Key, dict[str, Any]] = {}
        self.snapshot_queue: WorkQueue[Key] = WorkQueue(
            name="vmsnapshots",
            workers=4,
            on_error=cache_reporter(self.kube, "VMSnapshot", COMPONENT, self.snapshots, cas=True),
        )
        #: Keyed by the *VM* (namespace, vm name): one restore of a VM at a time.
        self.restore_queue: WorkQueue[Key] = WorkQueue(
            name="vmrestores",
            workers=4,
            on_error=error_reporter(
                self.kube,
                "VMRestore",
                COMPONENT,
                lookup=self._open_restores,  # the error may be any of them: each says so
                store=self._keep_restore,
                cas=True,
            ),
        )
        self.finalized: dict[Key, asyncio.Event] = {}
        self.log = get_logger("virtfleet.agent.snapshots", node=self.node)
        self.snapshot_store = self._store("VMSnapshot", self.snapshots)
        self.restore_store = self._store("VMRestore", self.restores)
        self._snapshot_loop = SnapshotLoop(self)
        self._restore_loop = RestoreLoop(self)

    def _store(self, kind: str, cache: dict[Key, dict[str, Any]]) -> ObjectStore:
        return ObjectStore(
            self.kube, kind, cache, node=self.node, finalizer=self.settings.finalizer, log=self.log
        )

    def _keep_restore(self, _: Key, body: Mapping[str, Any]) -> None:
        if key_of(body) in self.restores:
            self.restores[key_of(body)] = dict(body)

    def _open_restores(self, vm_key: Key) -> list[dict[str, Any]]:
        """The unfinished restores of one VM (what the restore queue's key stands for)."""
        done = (RestorePhase.SUCCEEDED.value, RestorePhase.FAILED.value)
        return [
            body
            for key, body in self.restores.items()
            if key[0] == vm_key[0]
            and (body.get("spec") or {}).get("vmName") == vm_key[1]
            and (body.get("status") or {}).get("phase") not in done
        ]

    # --- signals → keys ---------------------------------------------------------------

    def on_snapshot_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.snapshots.pop(key, None)
            self.snapshot_queue.forget(key)
            self.finalized.pop(key, None)  # a later snapshot of the same name starts afresh
            self._restores_of(key[0], str((body.get("spec") or {}).get("vmName", "")))
            return
        if not newer(self.snapshots.get(key), body):
            return  # our own newer write is already cached
        self.snapshots[key] = dict(body)
        if self._handles_snapshot(body):
            self.snapshot_queue.add(key)
        self._restores_of(key[0], str((body.get("spec") or {}).get("vmName", "")))

    def on_restore_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if (body.get("spec") or {}).get("backupName"):
            return  # a restore from a backup makes a new VM: the controller's (controller.backups)
        key = key_of(body)
        if event_type == "DELETED":
            self.restores.pop(key, None)
        elif newer(self.restores.get(key), body):
            self.restores[key] = dict(body)
        self._restores_of(key[0], str((body.get("spec") or {}).get("vmName", "")))

    def on_vm_event(self, key: Key) -> None:
        """A VM changed (or arrived in the cache): look at its snapshots and restores."""
        for snap_key, body in self.snapshots.items():
            if snap_key[0] == key[0] and (body.get("spec") or {}).get("vmName") == key[1]:
                self.snapshot_queue.add(snap_key)
        self._restores_of(*key)

    def forget_vm(self, key: Key) -> None:
        """The VM left the node (deleted, migrated away): its restore queue state goes too.

        The restore queue is keyed by the VM; its VMRestores themselves go with their own
        DELETED events.
        """
        self.restore_queue.forget(key)

    def bookkeeping(self) -> dict[str, int]:
        """Entries per structure kept per object (what must return to 0 with the objects)."""
        return {
            "snapshots": len(self.snapshots),
            "snapshot_finalized": len(self.finalized),
            "snapshot_queue": self.snapshot_queue.tracked,
            "restores": len(self.restores),
            "restore_queue": self.restore_queue.tracked,
        }

    def resync(self) -> None:
        for key, body in self.snapshots.items():
            if self._handles_snapshot(body):
                self.snapshot_queue.add(key)
        for body in list(self.restores.values()):
            self._restores_of(str(body["metadata"]["namespace"]), str(body["spec"]["vmName"]))

    async def on_reconnect(self, reconnect: bool) -> None:
        self.resync()

    def _restores_of(self, namespace: str, vm_name: str) -> None:
        if (namespace, vm_name) in self.agent.cache:
            self.restore_queue.add((namespace, vm_name))

    def vm_body(self, namespace: str, vm_name: str) -> Mapping[str, Any] | None:
        """The VM as cached, when it is this node's; else None (not our business)."""
        body = self.agent.cache.get((namespace, vm_name))
        if body is None or not self.agent.is_mine(body):
            return None
        return body

    def _handles_snapshot(self, body: Mapping[str, Any]) -> bool:
        """The VM is on this node; or it is gone and the snapshot is labelled for this node."""
        meta = body.get("metadata") or {}
        vm_name = str((body.get("spec") or {}).get("vmName", ""))
        if self.vm_body(str(meta.get("namespace")), vm_name) is not None:
            return True
        return (meta.get("labels") or {}).get(NODE_LABEL) == self.node and bool(
            meta.get("deletionTimestamp")
        )

    async def wait_snapshot_finalized(self, key: Key, timeout: float) -> bool:
        """For the kopf deletion handler: True once the libvirt snapshot is dealt with."""
        done = self.finalized.setdefault(key, asyncio.Event())
        self.snapshot_queue.add(key)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            self.log.debug("snapshot not finalized yet", namespace=key[0], vmsnapshot=key[1])
        return done.is_set()

    # --- the loops ------------------------------------------------------------------

    async def observe(
        self,
        vm_uid: str | None,
        name: str | None,
        *,
        want_xml: bool = False,
        vm_body: Mapping[str, Any] | None = None,
    ) -> tuple[DomainFacts, Guest | None]:
        """The VM's domain as both loops read it (:func:`~.domain.observe_domain`)."""
        return await observe_domain(
            self.hv,
            self.settings.default_pool,
            vm_uid,
            name,
            want_xml=want_xml,
            vm_body=vm_body,
        )

    async def reconcile_snapshot(self, key: Key) -> float | None:
        body = self.snapshots.get(key)
        if body is None:
            return None
        vm_key = (key[0], str((body.get("spec") or {}).get("vmName", "")))
        if self.locks.busy(vm_key):
            # Another loop, or another snapshot of the VM, works on its domain: look again
            # soon rather than hold one of the queue's few workers waiting for the lock. A
            # VM whose libvirt job is stuck (each call waits 30 s) and that had several
            # snapshots once held all of them, and no other VM's snapshot was taken.
            return BUSY_RETRY_SECONDS
        async with self.locks.lock(vm_key):
            return await self._snapshot_loop.reconcile(key)

    async def reconcile_restores(self, vm_key: Key) -> float | None:
        """Every unfinished restore of one VM; at most one of them acts."""
        async with self.locks.lock(vm_key):
            return await self._restore_loop.reconcile(vm_key)


# --- kopf wiring (called from virtfleet.agent.handlers.build_registry) ---------------------


def register(
    registry: kopf.OperatorRegistry,
    settings: AgentSettings,
    get: Callable[[], SnapshotAgent],
) -> None:
    """kopf handlers for VMSnapshots and VMRestores: feed the caches, hold finalizers.

    Events of every VMSnapshot/VMRestore are watched (which node cares depends on where
    the VM is, not on a label of the snapshot); the deletion handler only matches
    snapshots labelled for this node, so kopf keeps this node's finalizer on exactly
    those (the agent adds label and finalizer together when it adopts a snapshot).
    """
    on_node = {NODE_LABEL: settings.node_name}

    @kopf.on.event(API_GROUP, API_VERSION, "vmsnapshots", registry=registry)  # type: ignore[arg-type]
    def vmsnapshot_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_snapshot_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.event(API_GROUP, API_VERSION, "vmrestores", registry=registry)  # type: ignore[arg-type]
    def vmrestore_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_restore_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.delete(API_GROUP, API_VERSION, "vmsnapshots", labels=on_node, registry=registry)
    async def vmsnapshot_delete(body: Any, **_: Any) -> None:
        if not await get().wait_snapshot_finalized(key_of(body), DELETE_WAIT_SECONDS):
            raise kopf.TemporaryError("deleting the libvirt snapshot", delay=1)


def start(agent: Agent, locks: VmLocks) -> tuple[SnapshotAgent, list[asyncio.Task[None]]]:
    """The snapshot loops of a started agent: queues and a periodic resync."""
    snaps = SnapshotAgent(agent, locks)
    agent.hv.on_reconnect(snaps.on_reconnect)
    agent.on_forget(snaps.forget_vm)
    tasks = [
        asyncio.create_task(
            snaps.snapshot_queue.run(snaps.reconcile_snapshot), name="vmsnapshot-queue"
        ),
        asyncio.create_task(
            snaps.restore_queue.run(snaps.reconcile_restores), name="vmrestore-queue"
        ),
        asyncio.create_task(_resync(snaps), name="snapshot-resync"),
    ]
    return snaps, tasks


async def stop(snaps: SnapshotAgent) -> None:
    await snaps.snapshot_queue.stop()
    await snaps.restore_queue.stop()


async def _resync(snaps: SnapshotAgent) -> None:
    """Every ``resync_seconds``: lost libvirt metadata, deadlines, missed events."""
    while True:
        await asyncio.sleep(snaps.settings.resync_seconds)
        snaps.resync()
