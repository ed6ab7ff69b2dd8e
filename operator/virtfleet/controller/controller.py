"""The controller process: watches feed a cache and a work queue; one reconcile decides.

kopf is used only for what it is good at here — watching (with re-lists, bookmarks,
peering) — through ``on.event`` handlers that update :class:`FleetCache` and enqueue
keys. There are no create/update handlers, so kopf writes no annotations and no
finalizers on VirtualMachines from the controller (DESIGN §6). The reconcile of one VM:

1. unplaced and not being deleted → :func:`placement.place` under one lock (so rapid
   placements see each other), then status first (``nodeName``, with a resourceVersion
   precondition so two deciders cannot both place it), then the ``virtfleet.io/node``
   label. A crash between the two writes is repaired on the next pass, which also fixes
   any label that disagrees with ``status.nodeName``. A VM with ``type: network``
   interfaces waits until its VMNetworks exist, allow its namespace and list its
   addresses (:mod:`virtfleet.controller.networks`);
2. placed → label repair, and ``Unknown`` when the node's agent stopped beating;
3. placed on a cordoned Node (``spec.unschedulable``) → drain: a running VM with
   ``evictionStrategy: LiveMigrate`` gets a VMMigration ``<vm>-evict-<node>`` (labelled
   ``virtfleet.io/eviction=<node>``; the deterministic name makes a restart find it
   rather than create another), every other VM stays where it is and a Warning Event
   on the VM (and on the Node) says so.

The controller never writes ``spec`` (DESIGN §3.1) and writes status only when it
changes (§3.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from virtfleet.api.conditions import rfc3339
from virtfleet.api.resources import (
    VIRTUAL_MACHINE,
    VM_MIGRATION,
    VM_NETWORK,
)
from virtfleet.api.virtualmachine import PrintableStatus
from virtfleet.controller import decisions, wiring
from virtfleet.controller.backups import BackupController
from virtfleet.controller.cache import FleetCache
from virtfleet.controller.drain import Drainer
from virtfleet.controller.failover import Failover
from virtfleet.controller.metrics import ControllerMetrics
from virtfleet.controller.migrations import MigrationScheduler
from virtfleet.controller.networks import NetworkController
from virtfleet.controller.nodes import NodeKeeper
from virtfleet.controller.settings import ControllerSettings
from virtfleet.controller.unclaimed import UnclaimedWatcher
from virtfleet.identity import Key
from virtfleet.logs import LogFormat, get_logger
from virtfleet.reconcile.placement import (
    INVALID_SPEC,
    MAC_ADDRESS_CONFLICT,
    Placement,
    Unschedulable,
    place,
)
from virtfleet.reconcile.views import CachedVm, host_changed
from virtfleet.runtime.failures import cache_reporter, error_reporter
from virtfleet.runtime.kube import Conflict, KubeApi, NotFound
from virtfleet.runtime.metrics import (
    MetricsServer,
    count_requests,
    reconcile_histogram,
    timed,
)
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch

COMPONENT = "virtfleet-controller"
#: Retry delay after losing a compare-and-swap: the watch brings the newer object soon.
CONFLICT_RETRY = 1.0

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Controller:
    """State and behaviour of one controller process (see the module doc)."""

    def __init__(
        self,
        kube: KubeApi,
        settings: ControllerSettings | None = None,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.kube = kube
        self.settings = settings or ControllerSettings()
        self.clock = clock
        self.cache = FleetCache()
        self.queue: WorkQueue[Key] = WorkQueue(
            name="vms",
            workers=self.settings.workers,
            on_error=error_reporter(
                kube,
                VIRTUAL_MACHINE.kind,
                COMPONENT,
                lookup=lambda key: [self.cache.vms[key].body] if key in self.cache.vms else [],
                store=lambda _, body: self.cache.upsert_vm(body),
                cas=True,  # the agent writes the same status: never overwrite its newer one
            ),
        )
        self._placing = asyncio.Lock()
        self._log = get_logger("virtfleet.controller")
        #: VMMigration scheduling (validation, target choice); reads this fleet cache.
        self.migrations = MigrationScheduler(self.cache, kube, self.settings, clock)
        self.migrations.queue.on_error = cache_reporter(
            kube, VM_MIGRATION.kind, COMPONENT, self.migrations.cache, cas=True
        )
        #: Status of snapshots and restores whose VM is missing or unplaced.
        self.unclaimed = UnclaimedWatcher(self.cache, kube, clock)
        self.unclaimed.queue.on_error = cache_reporter(
            kube,
            lambda key: key[0],  # the keys are (kind, namespace, name)
            COMPONENT,
            self.unclaimed.cache,
            cas=True,
        )
        #: VMNetworks: VNIs, addresses, and whether a VM's networks let it be placed.
        self.networks = NetworkController(kube, self.cache.vms, self._enqueue, clock)
        self.networks.queue.on_error = cache_reporter(
            kube, VM_NETWORK.kind, COMPONENT, self.networks.cache, cas=True
        )
        #: Backup locations, deleting backups' objects, restores from backups into new VMs.
        self.backups = BackupController(kube, self.cache.vms)
        #: Cordoned nodes: live-migrate their VMs away, or say why one stays.
        self.drains = Drainer(self.cache, kube, self.migrations)
        #: Agents' Leases: node health, fencing (docs/failover.md).
        self.nodes = NodeKeeper(self.cache, kube, self.settings, clock, self._node_changed)
        #: VMs of fenced nodes, by their highAvailability policy.
        self.failover = Failover(
            self.cache,
            kube,
            self.settings,
            self.nodes,
            self.backups.cache,
            self.migrations.cache,
            self._placing,
            clock,
        )

    # --- intake (called from kopf's on.event handlers) ------------------------------------

    def vm_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key: Key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        self.unclaimed.vm_changed(*key)
        self.backups.vm_changed(*key)
        if event_type == "DELETED":
            gone = self.cache.remove_vm(key)
            self.networks.vm_changed(key, None)
            self.queue.forget(key)
            self.failover.forget(key)
            if gone is not None and gone.node_name is not None:
                self._enqueue_unplaced()  # its memory is free again
            return
        if self.cache.upsert_vm(body) is not None:
            self.networks.vm_changed(key, body)
            self.queue.add(key)

    def host_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name") or "")
        if event_type == "DELETED":
            self.cache.hosts.pop(name, None)
        else:
            old = self.cache.hosts.get(name)
            new = self.cache.upsert_host(body)
            if new is None or not host_changed(
                old, new, self.clock(), self.settings.heartbeat_timeout
            ):
                return  # a heartbeat: the periodic check sees a heartbeat stop
        self._enqueue_unplaced()
        for vm in self.cache.placed_on(name):
            self.queue.add(vm.key)

    def node_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name") or "")
        if event_type == "DELETED":
            self.cache.nodes.pop(name, None)
        else:
            old = self.cache.nodes.get(name)
            new = self.cache.upsert_node(body)
            if old == new:
                return  # kubelet status churn: nothing placement reads changed
            if new.unschedulable:
                for vm in self.cache.placed_on(name):
                    self.queue.add(vm.key)  # drain
            else:
                self.drains.forget_node(name)
        self._enqueue_unplaced()

    def _node_changed(self, node: str) -> None:
        """A node's health changed: its VMs (failover, Unknown), the VMs of fenced nodes
        (a node that fits may have appeared) and the unplaced ones."""
        for name, host in self.cache.hosts.items():
            if name == node or host.fenced:
                for vm in self.cache.placed_on(name):
                    self.queue.add(vm.key)
        self._enqueue_unplaced()

    def _enqueue(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.queue.add(key)

    def _enqueue_unplaced(self) -> None:
        for vm in self.cache.unplaced():
            self.queue.add(vm.key)

    # --- periodic passes ------------------------------------------------------------------

    def check_heartbeats(self) -> int:
        """Enqueue placed VMs whose agent looks silent; returns how many."""
        now = self.clock()
        count = 0
        for node in self.cache.nodes_with_vms():
            host = self.cache.hosts.get(node)
            if host is not None and host.fresh(now, self.settings.heartbeat_timeout):
                continue  # the usual case: O(nodes), not O(VMs)
            for vm in self.cache.placed_on(node):
                if vm.deleting:
                    continue
                if vm.status.get("printableStatus") == PrintableStatus.UNKNOWN.value:
                    continue  # already said; the full resync refreshes the message if needed
                self.queue.add(vm.key)
                count += 1
        return count

    def resync(self) -> None:
        for key in list(self.cache.vms):
            self.queue.add(key)
        self.unclaimed.resync()
        self.networks.resync()

    async def periodic(self) -> None:
        """Heartbeat checks every few seconds, a full resync every ``resync_interval``."""
        loop = asyncio.get_running_loop()
        last_resync = loop.time()
        while True:
            await asyncio.sleep(self.settings.heartbeat_check_interval)
            self.check_heartbeats()
            if loop.time() - last_resync >= self.settings.resync_interval:
                last_resync = loop.time()
                self.resync()

    # --- reconcile ------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        """Converge one VM; returns seconds until it should be looked at again, if ever."""
        vm = self.cache.vms.get(key)
        if vm is None:
            return None
        log = self._log.bind(namespace=vm.namespace, vm=vm.name)
        if vm.deleting:
            await self.failover.release_deleted(key, log)
            return None
        node = vm.node_name
        if node is None:
            return await self._schedule(key, log)
        log = log.bind(node=node)
        if vm.node_label != node and not await self._write_label(vm, node, log):
            return CONFLICT_RETRY
        host_node = self.cache.nodes.get(node)
        if host_node is not None and host_node.unschedulable:
            await self.drains.drain(key, node, log)
        return await self._check_node(key, log)

    async def _schedule(self, key: Key, log: Any) -> float | None:
        async with self._placing:
            vm = self.cache.vms.get(key)
            if vm is None or vm.deleting or vm.node_name is not None:
                return None  # changed while we waited for the lock
            outcome: Placement | Unschedulable
            mac_conflict = self.cache.macs.conflict(vm, self.cache.vms)
            network_hold = self.networks.hold(vm)
            if vm.request is None:
                outcome = Unschedulable(INVALID_SPEC, vm.spec_error or "unreadable spec")
            elif mac_conflict is not None:
                outcome = Unschedulable(MAC_ADDRESS_CONFLICT, mac_conflict)
            elif network_hold is not None:
                outcome = network_hold
            else:
                outcome = place(
                    vm.request,
                    self.cache.allocated(),
                    self.cache.hosts,
                    self.cache.nodes,
                    now=self.clock(),
                    heartbeat_timeout=self.settings.heartbeat_timeout,
                    overcommit=self.settings.overcommit,
                )
            old_status = vm.status
            wanted = decisions.scheduling_status(vm, outcome)
            # The decision is made under the lock; its write is not (at 10,000 VMs the
            # write's round trip under the lock capped placements at ~12/s).
            reserved = self.cache.reserve(vm, wanted) if isinstance(outcome, Placement) else None
        try:
            written = await self._write_status(vm, wanted, precondition=True)
        except BaseException as exc:
            if reserved is not None:
                self.cache.release(reserved, vm)
            if isinstance(exc, Conflict):
                log.debug("VM changed while deciding; retrying with the newer object")
                return CONFLICT_RETRY
            if isinstance(exc, NotFound):
                return None
            raise
        vm = written
        note = decisions.scheduling_note(old_status, outcome)
        if isinstance(outcome, Placement):
            log.info("placed", node=outcome.node, free_after=outcome.free_after_bytes)
            if not await self._write_label(vm, outcome.node, log.bind(node=outcome.node)):
                return CONFLICT_RETRY
        else:
            log.info("not placed", reason=outcome.reason, message=outcome.message)
        if note is not None:
            await self.kube.record_event(vm.body, note.type, note.reason, note.message, COMPONENT)
        return None if isinstance(outcome, Placement) else self.settings.retry_interval

    async def _check_node(self, key: Key, log: Any) -> float | None:
        moved, again = await self.failover.handle(key, log)
        if moved:
            return again
        unknown = await self._mark_unknown(key, log)
        return again if again is not None else unknown

    async def _mark_unknown(self, key: Key, log: Any) -> float | None:
        vm = self.cache.vms.get(key)
        if vm is None or vm.node_name is None:
            return None
        now = self.clock()
        wanted = decisions.unreachable_status(
            vm,
            self.cache.hosts.get(vm.node_name),
            now=now,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            timestamp=rfc3339(now),
        )
        if wanted is None:
            return None
        old = vm.status
        try:
            # Precondition: if the agent wrote meanwhile it is alive; re-decide then.
            updated = await self._write_status(vm, wanted, precondition=True)
        except Conflict:
            return CONFLICT_RETRY
        except NotFound:
            return None
        note = decisions.unreachable_note(old, wanted)
        if updated is not vm and note is not None:
            log.warning("node unreachable; VM marked Unknown", message=note.message)
            await self.kube.record_event(
                updated.body, note.type, note.reason, note.message, COMPONENT
            )
        return None

    async def _write_status(
        self, vm: CachedVm, wanted: Mapping[str, Any], *, precondition: bool
    ) -> CachedVm:
        """Write the difference between ``vm.status`` and ``wanted``; the cached view after."""
        patch = status_patch(vm.status, wanted)
        if patch is None:
            return vm
        body = await self.kube.patch_status(
            VIRTUAL_MACHINE.kind,
            vm.namespace,
            vm.name,
            patch,
            resource_version=vm.resource_version if precondition else None,
        )
        return self.cache.upsert_vm(body) or CachedVm.from_body(body)

    async def _write_label(self, vm: CachedVm, node: str, log: Any) -> bool:
        """The node label, and at first placement the node's finalizer, in one write.

        False when the VM changed meanwhile (its next watch event brings it back here).
        """
        if (vm.status.get("failover") or {}).get("toNode") == node:
            return await self.failover.move_metadata(vm, node, log)
        metadata = decisions.placement_metadata(
            vm.labels, vm.body.get("metadata", {}).get("finalizers") or [], node
        )
        if metadata is None:
            return True
        if "finalizers" in metadata:
            metadata["resourceVersion"] = vm.resource_version  # never drop another's
        try:
            body = await self.kube.patch(
                VIRTUAL_MACHINE.kind, vm.namespace, vm.name, {"metadata": metadata}
            )
        except NotFound:
            return True
        except Conflict:
            return False
        self.cache.upsert_vm(body)
        log.info("node label set", was=vm.node_label, finalizer="finalizers" in metadata)
        return True

    # --- kopf wiring ------------------------------------------------------------------------

    def registry(
        self, *, log_format: LogFormat = "auto", log_level: str = "INFO"
    ) -> kopf.OperatorRegistry:
        """A fresh kopf registry with this controller's handlers (no global side effects)."""
        handlers = wiring.Handlers(
            vm=self.vm_event,
            host=self.host_event,
            node=self.node_event,
            migration=self.migrations.event,
            network=self.networks.event,
            unclaimed=self.unclaimed.event,
            backups=self.backups.event,
            wait_until_served=self.kube.wait_until_served,
        )
        return wiring.registry(handlers, log_format=log_format, log_level=log_level)

    async def run(
        self,
        *,
        standalone: bool = True,
        peering_name: str | None = None,
        namespaces: Collection[str] = (),
        stop_flag: asyncio.Event | None = None,
        log_format: LogFormat = "auto",
        log_level: str = "INFO",
        liveness_endpoint: str | None = None,
        metrics_listen: str | None = None,
    ) -> None:
        """Run kopf, the work queue and the periodic passes until kopf exits."""
        reconcile: Callable[[Key], Awaitable[float | None]] = self.reconcile
        endpoint: MetricsServer | None = None
        if metrics_listen is not None:
            metrics = ControllerMetrics(self)
            count_requests(metrics.registry, self.kube)
            reconcile = timed(reconcile_histogram(metrics.registry), "VirtualMachine", reconcile)
            endpoint = MetricsServer(metrics_listen, metrics.exposition, "controller")
            try:
                await endpoint.start()
            except OSError as exc:  # placement matters more than its metrics
                self._log.error("metrics endpoint not served", error=str(exc))
                endpoint = None
        background = [
            asyncio.create_task(self.queue.run(reconcile), name="controller-queue"),
            asyncio.create_task(self.periodic(), name="controller-periodic"),
            asyncio.create_task(self.nodes.run(), name="node-health"),
            asyncio.create_task(
                self.migrations.queue.run(self.migrations.reconcile), name="migration-queue"
            ),
            asyncio.create_task(
                self.unclaimed.queue.run(self.unclaimed.reconcile), name="unclaimed-queue"
            ),
            asyncio.create_task(
                self.backups.queue.run(self.backups.reconcile), name="backup-queue"
            ),
            asyncio.create_task(self.networks.run(), name="network-queue"),
        ]
        try:
            await kopf.operator(
                registry=self.registry(log_format=log_format, log_level=log_level),
                standalone=standalone if peering_name is None else False,
                peering_name=peering_name,
                clusterwide=not namespaces,
                namespaces=list(namespaces),
                stop_flag=stop_flag,
                liveness_endpoint=liveness_endpoint,
            )
        finally:
            if endpoint is not None:
                await endpoint.stop()
            await self.queue.stop()
            await self.migrations.queue.stop()
            await self.unclaimed.queue.stop()
            await self.backups.queue.stop()
            await self.networks.queue.stop()
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.kube.close()
            logging.getLogger("virtfleet.controller").info("controller stopped")
