"""Node health in the controller: reads the agents' Leases, fences failed nodes, clears
the mark when an agent is back, writes VMHost ``status.health`` and Events
(decisions: :mod:`virtfleet.reconcile.node_health`; docs/failover.md).

Leases are listed every ``lease_poll_interval`` (one small request) rather than watched:
the list is cheap at any fleet size, works whatever namespaces the controller's watches
are limited to, and a missed watch event can never hide a silent node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from virtfleet.api.conditions import rfc3339
from virtfleet.api.vmhost import NodeHealthState
from virtfleet.controller.cache import FleetCache
from virtfleet.controller.settings import ControllerSettings
from virtfleet.logs import get_logger
from virtfleet.reconcile import node_health as rules
from virtfleet.reconcile.node_fencing import FENCED_ANNOTATION
from virtfleet.runtime.kube import Conflict, KubeApi, KubeError, NotFound

COMPONENT = "virtfleet-controller"
LEASE = "Lease"
#: Leases not listed for this long (at least): the controller was blind meanwhile.
BLIND_SECONDS = 5.0


class NodeKeeper:
    """See the module doc. ``on_change(node)`` enqueues the node's VMs."""

    def __init__(
        self,
        cache: FleetCache,
        kube: KubeApi,
        settings: ControllerSettings,
        clock: Callable[[], datetime],
        on_change: Callable[[str], None],
    ) -> None:
        self.cache = cache
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.health = rules.HealthSettings(
            fence_margin=settings.fence_margin,
            damping_base=settings.failure_damping,
            damping_max=settings.failure_damping_max,
        )
        self.memory: dict[str, rules.NodeMemory] = {}
        #: Taken to move a VM off a fenced node and to clear that node's mark: no VM is
        #: moved once the controller decided the agent is back.
        self.locks: dict[str, asyncio.Lock] = {}
        self._written: dict[str, dict[str, Any]] = {}
        self._blind_since: datetime | None = None
        self.log = get_logger("virtfleet.controller.nodes")

    def lock(self, node: str) -> asyncio.Lock:
        return self.locks.setdefault(node, asyncio.Lock())

    def fence_mark(self, node: str) -> rules.FenceMark | None:
        """The node's fence mark, while its VMs may fail over (None otherwise). Read under
        :meth:`lock`."""
        lease = self.cache.leases.get(node)
        if lease is None or lease.mark is None or lease.back_after_fence:
            return None
        return lease.mark

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except KubeError as exc:
                self.log.info("Leases not listed", error=str(exc))
            except Exception as exc:  # the loop must outlive one bad pass; logged
                self.log.exception("node health pass failed", error=str(exc))
            asleep = time.monotonic()
            await asyncio.sleep(self.settings.lease_poll_interval)
            self.woke_late(time.monotonic() - asleep - self.settings.lease_poll_interval)

    def woke_late(self, seconds: float) -> None:
        """The controller itself did not run for ``seconds`` (stopped, starved of CPU, a
        machine-wide stall): it is blind for that time, as when the apiserver is out of
        reach. Silence it did not watch is no evidence against a node; at worst a failover
        comes one Lease duration later, never one too early (CI: a 14 s stall of the whole
        machine made the controller fail a node whose agent stalled with it)."""
        if seconds > BLIND_SECONDS:
            since = self.clock() - timedelta(seconds=seconds)
            self._blind_since = min(self._blind_since or since, since)

    async def poll(self) -> None:
        asked = self.clock()
        try:
            bodies = await self.kube.list(LEASE, namespace=self.settings.lease_namespace)
        except KubeError:
            self._blind_since = self._blind_since or asked
            raise
        now = self.clock()
        listed = set()
        for body in bodies:
            lease = self.cache.upsert_lease(body, now)
            if lease is not None:
                listed.add(lease.node)
        for gone in set(self.cache.leases) - listed:
            self.log.info("Lease gone: the node is judged by its VMHost heartbeat", node=gone)
            self.cache.drop_lease(gone)
            self.memory.pop(gone, None)
        # Blind: the list calls failed, or this one took long (the apiserver was out of
        # reach), or the controller did not run (woke_late). Not a slow pass of our own
        # that kept running: it sees every renewal.
        since = self._blind_since or asked
        self._blind_since = None
        blind = (now - since).total_seconds()
        if blind > max(BLIND_SECONDS, 3 * self.settings.lease_poll_interval):
            # The controller could not see renewals meanwhile: it cannot say anyone was
            # silent, so every node's silence counts from now.
            self.log.warning("Leases unreadable for a while; sightings restart", seconds=blind)
            self.cache.renew_sightings(now)
        disruption = rules.disrupted(
            [lease for node, lease in self.cache.leases.items() if node in self.cache.nodes], now
        )
        for node in list(self.cache.leases):
            try:
                await self.judge(node, disruption=disruption)
            except KubeError as exc:
                self.log.warning("node health not written", node=node, error=str(exc))

    async def judge(self, node: str, *, disruption: bool = False) -> None:
        lease = self.cache.leases[node]
        now = self.clock()
        memory = self.memory.get(node)
        if memory is None:
            host = self.cache.hosts.get(node)
            memory = rules.NodeMemory(placeable_after=host.placeable_after if host else None)
        node_view = self.cache.nodes.get(node)
        out_of_service = bool(node_view and node_view.out_of_service)

        def verdict_now(memory: rules.NodeMemory) -> rules.Verdict:
            return rules.judge(
                self.cache.leases[node],
                now,
                out_of_service=out_of_service,
                memory=memory,
                settings=self.health,
                disruption=disruption,
            )

        verdict = verdict_now(memory)
        if verdict.fence is not None:
            memory = await self._fence(node, lease, verdict, memory, now)
        elif verdict.clear_mark:
            memory = await self._clear(node, lease, memory, now)
        verdict = verdict_now(memory)  # after our own write
        if verdict.state != memory.state:
            self.log.info("node health", node=node, state=verdict.state.value, why=verdict.message)
            if memory.state is not None or verdict.state is not NodeHealthState.HEALTHY:
                self.on_change(node)
            memory = rules.NodeMemory(memory.failures, memory.placeable_after, verdict.state, now)
        self.memory[node] = memory
        await self._write_health(node, rules.health_status(verdict, memory, memory.since or now))

    async def _fence(
        self,
        node: str,
        lease: rules.LeaseView,
        verdict: rules.Verdict,
        memory: rules.NodeMemory,
        now: datetime,
    ) -> rules.NodeMemory:
        assert verdict.fence is not None
        if not await self._write_mark(node, lease, verdict.fence.encode(), now):
            return memory  # renewed (or gone) meanwhile: the next poll judges again
        message = f"node {node} fenced: {verdict.fence.reason}"
        self.log.warning("node fenced", node=node, why=verdict.fence.reason)
        await self.kube.record_event(vmhost_ref(node), "Warning", "NodeFenced", message, COMPONENT)
        self.on_change(node)
        return rules.after_fence(memory, now, self.health)

    async def _clear(
        self, node: str, lease: rules.LeaseView, memory: rules.NodeMemory, now: datetime
    ) -> rules.NodeMemory:
        if not await self._write_mark(node, lease, None, now):
            return memory
        memory = rules.after_recovery(memory, now, self.health)
        held = rfc3339(memory.placeable_after) if memory.placeable_after else "now"
        message = (
            f"the agent of {node} is back after its fence; it removes its stale copies. "
            f"No placements on it until {held} (damping after {len(memory.failures)} "
            "failure(s))"
        )
        self.log.info("node back after fence", node=node, placeable_after=held)
        await self.kube.record_event(
            vmhost_ref(node), "Normal", "NodeRecovered", message, COMPONENT
        )
        self.on_change(node)
        return memory

    async def _write_mark(
        self, node: str, lease: rules.LeaseView, mark: str | None, now: datetime
    ) -> bool:
        """Set (or, with None, clear) the fence mark, compare-and-swap on the Lease as it
        was judged, under the node's lock (no VM moves meanwhile); False when it lost."""
        patch = {
            "metadata": {
                "resourceVersion": lease.resource_version,
                "annotations": {FENCED_ANNOTATION: mark},
            }
        }
        async with self.lock(node):
            try:
                body = await self.kube.patch(
                    LEASE, self.settings.lease_namespace, rules.LEASE_PREFIX + node, patch
                )
            except (Conflict, NotFound):
                return False
            self.cache.upsert_lease(body, now)
        return True

    async def _write_health(self, node: str, health: Any) -> None:
        wire = health.to_wire()
        comparable = {k: v for k, v in wire.items() if k != "since"}
        if self._written.get(node) == comparable:
            return
        try:
            body = await self.kube.patch_status("VMHost", None, node, {"health": wire})
        except NotFound:
            return  # no VMHost yet: the agent makes it with its first heartbeat
        self._written[node] = comparable
        self.cache.upsert_host(body, cached_only=True)


def vmhost_ref(node: str) -> dict[str, str]:
    return {"apiVersion": "virtfleet.io/v1alpha1", "kind": "VMHost", "name": node}
