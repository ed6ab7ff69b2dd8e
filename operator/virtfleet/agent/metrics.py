"""The node agent's metrics: its VMs' usage (KubeVirt's shapes), its VMs by phase, libvirt.

Usage comes from one bulk libvirt call per ``interval`` (:mod:`virtfleet.hypervisor.stats`)
made by :meth:`AgentMetrics.run`, kept as a snapshot whose text is rendered once: a scrape
costs no libvirt call and no per-VM formatting, however many VMs run and however often
Prometheus asks. Labels are
``namespace``, ``name`` and ``node`` (plus ``drive``/``interface`` by their spec names),
never a uid. Device names are read from a domain's live XML once per run of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from virtfleet.agent.usage_metrics import VmUsage, render_usage
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineStatus
from virtfleet.domain.errors import DomainError
from virtfleet.domain.stats import DeviceNames, device_names, usage_from_stats
from virtfleet.hypervisor import HypervisorError
from virtfleet.logs import get_logger
from virtfleet.reconcile.views import parse_time
from virtfleet.runtime.metrics import QueueCollector

if TYPE_CHECKING:
    from virtfleet.agent.agent import Agent

__all__ = ["AgentMetrics", "VmUsage"]

VM_LABELS: Final = ["namespace", "name", "node"]


class AgentMetrics:
    """The agent's registry, and the loop that keeps its usage snapshot fresh."""

    def __init__(self, agent: Agent, interval: float) -> None:
        self.agent = agent
        self.interval = interval
        self.node = agent.settings.node_name
        self.registry = CollectorRegistry()
        self._snapshot: list[VmUsage] = []
        #: The snapshot's text, rendered at the first scrape after it changed.
        self._usage_text: bytes | None = None
        self.collected_at: float | None = None
        self.collect_seconds: float | None = None
        #: Device names by (uuid, run id): read once per run of a domain.
        self._names: dict[tuple[str, int], DeviceNames] = {}
        self.log = get_logger("virtfleet.agent.metrics", node=self.node)
        self.registry.register(_NodeCollector(self))
        self.registry.register(_MigrationCollector(self))
        self.migrations = Counter(
            "virtfleet_migrations",
            "Live migration jobs run from this node, by outcome.",
            ["node", "outcome"],
            registry=self.registry,
        )
        self.from_creation = Histogram(
            "virtfleet_vm_phase_transition_time_from_creation_seconds",
            "From a VM's creation to its first start (Running), as its agent saw it.",
            ["node", "phase"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.snapshots = Counter(
            "virtfleet_snapshots",
            "libvirt snapshots the agent took for VMSnapshots, by outcome.",
            ["node", "outcome"],
            registry=self.registry,
        )
        self.snapshot_seconds = Histogram(
            "virtfleet_snapshot_duration_seconds",
            "How long taking them took (freeze, libvirt, thaw), by outcome.",
            ["node", "outcome"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.libvirt_calls = Histogram(
            "virtfleet_libvirt_call_duration_seconds",
            "libvirt calls the agent made, by operation (where in virtfleet) and pool.",
            ["node", "operation", "pool"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 120),
            registry=self.registry,
        )
        self.migration_seconds = Histogram(
            "virtfleet_migration_duration_seconds",
            "How long live migration jobs from this node ran, by outcome.",
            ["node", "outcome"],
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.registry.register(QueueCollector(lambda: {"vms": agent.queue}))

    @property
    def snapshot(self) -> list[VmUsage]:
        return self._snapshot

    @snapshot.setter
    def snapshot(self, snapshot: list[VmUsage]) -> None:
        self._snapshot = snapshot
        self._usage_text = None

    def exposition(self) -> bytes:
        """What ``/metrics`` serves: the registry's families, then the usage snapshot's
        (rendered once per snapshot, by :meth:`refresh`: :mod:`virtfleet.agent.usage_metrics`)."""
        if self._usage_text is None:
            self._usage_text = render_usage(self._snapshot, self.node)
        return generate_latest(self.registry) + self._usage_text

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except HypervisorError as exc:
                self.log.info("usage not collected", error=str(exc))
            except Exception as exc:  # the loop outlives one bad round; logged
                self.log.exception("usage collection failed", error=str(exc))
            await asyncio.sleep(self.interval)

    async def refresh(self) -> None:
        started = time.perf_counter()
        records = await self.agent.hv.domain_stats()
        snapshot: list[VmUsage] = []
        seen: set[tuple[str, int]] = set()
        for record in records:
            key = self.agent.by_uid.get(record.uuid)
            if key is None:
                continue  # not a VM of this agent (yet, or any more)
            run = (record.uuid, record.run_id)
            seen.add(run)
            names = self._names.get(run) or await self._device_names(record.uuid)
            if names is not None:
                self._names[run] = names
            snapshot.append(VmUsage(key[0], key[1], usage_from_stats(record.stats, names)))
        for run in [r for r in self._names if r not in seen]:
            del self._names[run]
        # Rendered in a worker thread (~0.1 s at 1,000 VMs): the loop keeps reconciling.
        text = await asyncio.to_thread(render_usage, snapshot, self.node)
        self._snapshot, self._usage_text = snapshot, text
        self.collect_seconds = time.perf_counter() - started
        self.collected_at = time.time()

    async def _device_names(self, uuid: str) -> DeviceNames | None:
        try:
            guest = await self.agent.hv.lookup(uuid)
            return device_names(await guest.xml()) if guest is not None else None
        except (HypervisorError, DomainError) as exc:
            self.log.info("device names not read", uuid=uuid, error=str(exc))
            return None

    def libvirt_call(self, pool: str, operation: str, seconds: float) -> None:
        """Every libvirt call the agent makes (:meth:`Hypervisor.observe_calls`)."""
        self.libvirt_calls.labels(self.node, operation, pool).observe(seconds)

    def status_written(self, before: Mapping[str, Any], status: VirtualMachineStatus) -> None:
        """A VM's first Running since it was created: how long that took (KubeVirt's
        ``phase_transition_time_from_creation``). Only the first: later starts are not
        "from creation"."""
        previous = (before.get("status") or {}).get("printableStatus")
        first_start = previous in (
            None,
            PrintableStatus.SCHEDULING.value,
            PrintableStatus.STARTING.value,
        )
        if status.printable_status is not PrintableStatus.RUNNING or not first_start:
            return
        if status.restart_count:
            return
        started = parse_time(status.last_start_time)
        born = parse_time((before.get("metadata") or {}).get("creationTimestamp"))
        if started is not None and born is not None and started >= born:
            self.from_creation.labels(self.node, "Running").observe(
                (started - born).total_seconds()
            )

    def snapshot_taken(self, outcome: str, seconds: float) -> None:
        self.snapshots.labels(self.node, outcome).inc()
        self.snapshot_seconds.labels(self.node, outcome).observe(seconds)

    def migration_ended(self, outcome: str, seconds: float) -> None:
        self.migrations.labels(self.node, outcome).inc()
        self.migration_seconds.labels(self.node, outcome).observe(seconds)

    @property
    def tracked(self) -> int:
        """Per-VM state held (the churn test's bookkeeping)."""
        return len(self._names)


class _NodeCollector(Collector):
    """This node's VMs by phase, its libvirt connection and the usage snapshot's age."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        agent, node = self.metrics.agent, self.metrics.node
        phases: dict[str, int] = {}
        for body in list(agent.cache.values()):
            phase = (body.get("status") or {}).get("printableStatus") or "Unknown"
            phases[phase] = phases.get(phase, 0) + 1
        vms = GaugeMetricFamily(
            "virtfleet_node_vms", "VMs on this node by phase.", labels=["node", "phase"]
        )
        for phase, count in sorted(phases.items()):
            vms.add_metric([node, phase], count)
        yield vms
        connected = GaugeMetricFamily(
            "virtfleet_libvirt_connected", "1 while the agent's libvirt connection is up.",
            labels=["node"],
        )  # fmt: skip
        connected.add_metric([node], 1 if agent.hv.connected else 0)
        yield connected
        connections = CounterMetricFamily(
            "virtfleet_libvirt_connections_total",
            "libvirt connections the agent opened (more than one: reconnects).",
            labels=["node"],
        )
        connections.add_metric([node], agent.hv.connection_generation)
        yield connections
        if self.metrics.collect_seconds is not None:
            took = GaugeMetricFamily(
                "virtfleet_usage_collection_seconds",
                "How long the last bulk libvirt statistics call took.",
                labels=["node"],
            )
            took.add_metric([node], self.metrics.collect_seconds)
            yield took


class _MigrationCollector(Collector):
    """Live migrations running from this node: their last job sample (KubeVirt's
    ``kubevirt_vmi_migration_*`` shapes)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.metrics.node
        families = {
            "data_total": GaugeMetricFamily(
                "virtfleet_vm_migration_data_total_bytes",
                "Bytes the running migration moves (memory and copied disks).",
                labels=VM_LABELS,
            ),
            "data_processed": GaugeMetricFamily(
                "virtfleet_vm_migration_data_processed_bytes",
                "Bytes moved so far.",
                labels=VM_LABELS,
            ),
            "data_remaining": GaugeMetricFamily(
                "virtfleet_vm_migration_data_remaining_bytes",
                "Bytes left to move.",
                labels=VM_LABELS,
            ),
            "memory_bps": GaugeMetricFamily(
                "virtfleet_vm_migration_memory_transfer_rate_bytes",
                "Memory copied per second.",
                labels=VM_LABELS,
            ),
            "dirty": GaugeMetricFamily(
                "virtfleet_vm_migration_dirty_memory_rate_bytes",
                "Memory the guest dirties per second.",
                labels=VM_LABELS,
            ),
        }
        for (namespace, _), (vm_name, sample) in list(self.metrics.agent.migration_samples.items()):
            labels = [namespace, vm_name, node]
            families["data_total"].add_metric(labels, sample.data_total)
            families["data_processed"].add_metric(labels, sample.data_processed)
            families["data_remaining"].add_metric(labels, sample.data_remaining)
            families["memory_bps"].add_metric(labels, sample.memory_bps)
            dirty = sample.dirty_rate_bytes_per_second
            if dirty is not None:  # libvirt gave no page size: unsaid, not guessed
                families["dirty"].add_metric(labels, dirty)
        yield from families.values()
