"""kopf wiring of the node agent: thin handlers that only feed :class:`Agent`.

kopf is used for what it is good at, watching and finalizers; handlers never decide.
``on.event`` keeps the cache and enqueues (event handlers are not retried, DESIGN §6),
``on.delete`` holds the node's own finalizer until the agent has cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from typing import Any

import kopf

from virtfleet.agent import health
from virtfleet.agent import migration as migration_loops
from virtfleet.agent.agent import Agent, key_of
from virtfleet.agent.backups import loop as backup_loop
from virtfleet.agent.backups import wiring as backup_wiring
from virtfleet.agent.bookkeeping import BookkeepingLog
from virtfleet.agent.console import ConsoleServer
from virtfleet.agent.fencing import NodeFencing
from virtfleet.agent.host import heartbeat, sweep_orphans
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.metrics import AgentMetrics
from virtfleet.agent.settings import DELETE_WAIT_SECONDS, AgentSettings
from virtfleet.agent.snapshot import agent as snapshot_loops
from virtfleet.api.vmhost import VMHostStatus
from virtfleet.hypervisor import Hypervisor, HypervisorSettings
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor.settings import backoff_delays
from virtfleet.identity import API_GROUP, API_VERSION, NODE_LABEL
from virtfleet.logs import get_logger
from virtfleet.runtime import apisession
from virtfleet.runtime.kopfsettings import EmptyEssence
from virtfleet.runtime.kube import KubeClient
from virtfleet.runtime.memory import release_free_memory
from virtfleet.runtime.metrics import (
    MetricsServer,
    count_requests,
    reconcile_histogram,
    timed,
)


class NoDiffBase(EmptyEssence):
    """kopf's "last handled" state, never stored: the object as it is now counts as handled.

    The agent has no on.create/on.update/on.field handlers: every change goes through the
    level-triggered reconcile, which needs no diff. kopf's default annotation storage would
    still write ``last-handled-configuration`` (and a ``kopf-managed`` marker) on every new
    object and again after every label or spec change: one extra apiserver write per VM,
    snapshot and migration for nothing (the write budget of issue #9). With this storage
    each event's essence equals the "stored" one, so kopf sees no change (NOOP), runs the
    deletion handlers when ``deletionTimestamp`` appears, and keeps the finalizers. The
    essence is empty (:class:`EmptyEssence`): kopf's own deep-copied every event's body
    twice only for the copies to compare equal (~4 % of an agent's busy CPU).
    """

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def kopf_settings(settings: AgentSettings) -> kopf.OperatorSettings:
    """Per-node finalizer and storage prefixes, so agents never strip each other's (§6)."""
    ks = kopf.OperatorSettings()
    prefix = f"agent-{settings.node_name}.{API_GROUP}"
    ks.persistence.finalizer = settings.finalizer
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    ks.persistence.diffbase_storage = NoDiffBase()
    ks.posting.enabled = False  # Events come from the agent itself, with its own reasons
    # The apiserver sends this agent its own node's VMs only: a fleet's other VMs cost it
    # no event, no decoding and no memory (kopf's ``labels=`` filters are client-side).
    # A VM whose label moves away (migrated, failed over) arrives as DELETED: forgotten.
    ks.watching.label_selectors[API_GROUP, "virtualmachines"] = f"{NODE_LABEL}={settings.node_name}"
    if settings.watch_server_timeout is not None:
        # The apiserver takes whole seconds (timeoutSeconds=8.0 is refused).
        ks.watching.server_timeout = round(settings.watch_server_timeout)
    return ks


def build_registry(settings: AgentSettings) -> kopf.OperatorRegistry:
    """The agent's handlers on a registry of their own (importing has no side effects)."""
    registry = kopf.OperatorRegistry()
    on_node = {NODE_LABEL: settings.node_name}
    log = get_logger("virtfleet.agent", node=settings.node_name)
    holder: dict[str, Any] = {}

    def agent() -> Agent:
        return holder["agent"]  # type: ignore[no-any-return]

    def snaps() -> snapshot_loops.SnapshotAgent:
        return holder["snapshots"]  # type: ignore[no-any-return]

    def migrations() -> migration_loops.MigrationAgent:
        return holder["migrations"]  # type: ignore[no-any-return]

    def backups() -> backup_loop.BackupAgent:
        return holder["backups"]  # type: ignore[no-any-return]

    snapshot_loops.register(registry, settings, snaps)
    migration_loops.register(registry, settings, migrations)
    backup_wiring.register(registry, backups)

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        # A registry of our own has no default login handler: use the official client's,
        # on a session whose connection pool is bounded (kopf's is not: runtime.apisession).
        return apisession.login(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        # kopf logs every successful on.event call at INFO: a line per watch event, which
        # at 1,000 VMs costs more CPU than the reconciles (failures still log at WARNING).
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # As many long libvirt jobs (starts) as reconcile workers: with fewer, a burst of
        # creations queues behind a couple of QEMU start-ups (measured: 100 VMs 100 ms apart).
        hv = Hypervisor(
            HypervisorSettings(uri=settings.libvirt_uri, long_executor_workers=settings.workers)
        )
        the_agent = Agent(settings, hv, KubeClient())
        await the_agent.kube.wait_until_served()
        holder["agent"] = the_agent
        hv.on_event(the_agent.on_domain_event)
        hv.on_reconnect(the_agent.on_reconnect)
        # One lock per VM, shared with the snapshot/restore loops (they must not interleave).
        locks = VmLocks()
        holder["snapshots"], snapshot_tasks = snapshot_loops.start(the_agent, locks)
        holder["migrations"], migration_tasks = migration_loops.start(
            the_agent, locks, holder["snapshots"]
        )
        holder["backups"], backup_tasks = backup_wiring.start(the_agent, locks)
        await holder["backups"].restores.preload()  # before any VM may start: its holds
        # Its hold keeps HA VMs until the Lease is read. The Lease has a client of its own
        # (one thread, short timeout): renewals never queue behind the VM loops' calls.
        fencing = NodeFencing(the_agent, lease_kube=KubeClient(max_workers=1, request_timeout=5.0))
        holder["fencing"] = fencing
        fencing_tasks = await fencing.start()
        await _open_when_libvirtd_answers(hv, log)
        if settings.console_listen is not None:
            # Before the first reconcile: every status written names the endpoint.
            server = ConsoleServer(
                settings.node_name,
                settings.console_listen,
                settings.console_advertise,
                hv,
                # Reviews on a client of their own: callers never queue the VMs' calls.
                KubeClient(max_workers=2, request_timeout=10.0),
            )
            try:
                the_agent.console = await server.start()
            except OSError as exc:
                # VMs matter more than their consoles: run on without one, and say so.
                log.error("console endpoint not served", error=str(exc))
                await server.kube.close()
            else:
                holder["console"] = server
        # Before the first reconcile: a VM with a user NIC only starts behind it.
        await the_agent.driver.firewall.ensure(hv)
        if settings.tunnel_address is not None:
            from virtfleet.hostnet.adapter import HostNetwork  # pyroute2: only where needed

            the_agent.networks.host = HostNetwork(
                settings.network_state_dir,
                local=settings.tunnel_address,
                nat_denied=settings.nat_deny_cidrs,
            )
        reconcile = locks.guard(holder["migrations"].guard(the_agent.reconcile))
        metrics_tasks: list[asyncio.Task[None]] = []
        if settings.metrics_listen is not None:
            the_agent.metrics = AgentMetrics(the_agent, settings.metrics_interval_seconds)
            hv.observe_calls(the_agent.metrics.libvirt_call)
            count_requests(the_agent.metrics.registry, the_agent.kube)
            reconcile = timed(
                reconcile_histogram(the_agent.metrics.registry), "VirtualMachine", reconcile
            )
            endpoint = MetricsServer(settings.metrics_listen, the_agent.metrics.exposition, "agent")
            try:
                await endpoint.start()
            except OSError as exc:
                log.error("metrics endpoint not served", error=str(exc))
            else:
                holder["metrics"] = endpoint
            metrics_tasks.append(asyncio.create_task(the_agent.metrics.run(), name="metrics"))
        holder["tasks"] = [
            *metrics_tasks,
            asyncio.create_task(the_agent.networks.run(), name="vmnetworks"),
            asyncio.create_task(the_agent.guest_agents.run(), name="guest-agents"),
            asyncio.create_task(the_agent.queue.run(reconcile), name="vm-queue"),
            asyncio.create_task(
                _periodic(the_agent, _bookkeeping(the_agent, locks, holder), fencing),
                name="node-periodic",
            ),
            *fencing_tasks,
            *snapshot_tasks,
            *migration_tasks,
            *backup_tasks,
        ]
        log.info("agent started", libvirt=settings.libvirt_uri)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        the_agent = holder.get("agent")
        if the_agent is None:
            return
        await the_agent.queue.stop()
        await snapshot_loops.stop(holder["snapshots"])
        await backup_wiring.stop(holder["backups"])
        await holder["migrations"].queue.stop()
        for task in holder.get("tasks", []):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if "metrics" in holder:
            await holder["metrics"].stop()
        if "console" in holder:
            await holder["console"].stop()
            await holder["console"].kube.close()
        await the_agent.hv.close()
        await the_agent.kube.close()
        if "fencing" in holder:
            await holder["fencing"].lease.kube.close()

    # No client-side label filter: the watch is filtered by the apiserver (kopf_settings),
    # and a VM relabelled for another node must reach on_vm_event as DELETED.
    @kopf.on.event(API_GROUP, API_VERSION, "virtualmachines", registry=registry)  # type: ignore[arg-type]
    def vm_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            agent().on_vm_event(event.get("type"), copy.deepcopy(obj))
            snaps().on_vm_event(key_of(obj))
            if "backups" in holder:
                backups().on_vm_event(key_of(obj))

    @kopf.on.delete(API_GROUP, API_VERSION, "virtualmachines", labels=on_node, registry=registry)
    async def vm_delete(body: Any, **_: Any) -> None:
        key = key_of(body)
        if agent().never_placed(key, body):
            # kopf put this node's finalizer on for the label; nothing here to clean up.
            log.info("VM never placed here is deleted: finalizer released", vm=f"{key[0]}/{key[1]}")
            return
        if not await agent().wait_finalized(key, DELETE_WAIT_SECONDS):
            raise kopf.TemporaryError("stopping the domain and removing its volumes", delay=1)

    @kopf.on.event(API_GROUP, API_VERSION, "vmnetworks", registry=registry)  # type: ignore[arg-type]
    def vmnetwork_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict) and "agent" in holder:
            agent().networks.on_network_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.event(API_GROUP, API_VERSION, "vmhosts", registry=registry)  # type: ignore[arg-type]
    def vmhost_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict) and "agent" in holder:
            agent().networks.on_host_event(event.get("type"), obj)

    health.register(registry, settings, lambda: holder.get("agent"))
    return registry


async def _open_when_libvirtd_answers(hv: Hypervisor, log: Any) -> None:
    """Connect to libvirtd, waiting for it with a short backoff.

    A startup handler that fails is retried by kopf only after 60 s. An agent started
    while its libvirtd restarts (a node boot, a crash, the chaos test) then sat idle
    for that minute — no heartbeat, no reconcile — and the controller refused every
    migration to the node meanwhile ("agent heartbeat stale").
    """
    delays = backoff_delays(0.5, 5.0)
    while True:
        try:
            await hv.open()
            return
        except (hv_errors.HypervisorError, OSError) as exc:
            delay = next(delays)
            log.warning("libvirtd does not answer yet; retrying", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)


def _bookkeeping(agent: Agent, locks: VmLocks, holder: dict[str, Any]) -> BookkeepingLog:
    def count() -> dict[str, int]:
        return {
            **agent.bookkeeping(),
            "vm_locks": len(locks),
            **holder["snapshots"].bookkeeping(),
            **holder["migrations"].bookkeeping(),
            **agent.kube.bookkeeping(),
        }

    return BookkeepingLog(count, agent.settings.node_name)


async def _periodic(
    agent: Agent, books: BookkeepingLog | None = None, fencing: NodeFencing | None = None
) -> None:
    """Heartbeat every few seconds; resync and orphan sweep every ``resync_seconds``.

    With each heartbeat, the per-object bookkeeping is logged if it changed and freed
    heap pages go back to the kernel (:func:`release_free_memory`).
    """
    log = agent.log
    previous: VMHostStatus | None = None
    loop = asyncio.get_running_loop()
    next_resync = loop.time() + agent.settings.resync_seconds
    while True:
        try:
            sent = dict(agent.networks.realised)  # what this beat reports, at the latest
            previous = await heartbeat(
                agent, previous, fencing.quarantined_vms if fencing else None
            )
            agent.networks.reported = sent
        except Exception as exc:  # a missed beat is retried at the next one
            log.warning("heartbeat failed", error=str(exc))
        if books is not None:
            books.check()
        await loop.run_in_executor(None, release_free_memory)
        if loop.time() >= next_resync:
            next_resync = loop.time() + agent.settings.resync_seconds
            await agent.driver.firewall.ensure(agent.hv)  # heals a flushed ruleset
            agent.resync()
            if fencing is not None and not fencing.may_sweep:
                log.info("orphan sweep skipped: the node recovers from a fence")
                await asyncio.sleep(agent.settings.heartbeat_seconds)
                continue
            try:
                removed = await sweep_orphans(agent)
                if removed:
                    log.warning("orphans removed", removed=removed)
            except Exception as exc:
                log.warning("orphan sweep failed", error=str(exc))
        await agent.networks.host_changed(agent.settings.heartbeat_seconds)


async def run(
    settings: AgentSettings,
    *,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | None = None,
) -> None:
    """Run the agent until ``stop_flag`` (or a signal) stops it."""
    await kopf.operator(
        registry=build_registry(settings),
        settings=kopf_settings(settings),
        standalone=True,
        clusterwide=True,
        stop_flag=stop_flag,
        liveness_endpoint=liveness_endpoint,
    )
