"""The controller's metrics: the fleet as the cluster sees it, and the controller's queues.

Everything is read from :class:`~virtfleet.controller.cache.FleetCache` at scrape time
(a walk over cached VMs and hosts: no apiserver call). Per-VM usage is the agents'
(:mod:`virtfleet.agent.metrics`): only the node running a VM can read its counters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.views import CachedVm
from virtfleet.runtime.metrics import QueueCollector, escape_help, escape_label

if TYPE_CHECKING:
    from virtfleet.controller.controller import Controller

__all__ = ["ControllerMetrics"]


class ControllerMetrics:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.registry = CollectorRegistry()
        self.registry.register(_FleetCollector(controller))
        self.registry.register(
            QueueCollector(
                lambda: {
                    "vms": controller.queue,
                    "migrations": controller.migrations.queue,
                    "unclaimed": controller.unclaimed.queue,
                    "backups": controller.backups.queue,
                    "networks": controller.networks.queue,
                }
            )
        )

    def exposition(self) -> bytes:
        """What ``/metrics`` serves: the registry's families, then one series of
        ``virtfleet_vm_info`` and ``virtfleet_vm_ready`` per VM, written directly (at
        10,000 VMs prometheus_client's formatting of them took ~0.4 s per scrape)."""
        return generate_latest(self.registry) + render_vm_series(
            list(self.controller.cache.vms.values())
        )


class _FleetCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        cache = self.controller.cache
        phases: dict[tuple[str, str], int] = {}
        allocated: dict[str, int] = {}
        for vm in list(cache.vms.values()):
            node = vm.labels.get(NODE_LABEL, "")
            phase = str(vm.status.get("printableStatus") or "Pending")
            phases[(node, phase)] = phases.get((node, phase), 0) + 1
            if node and vm.request is not None and not vm.deleting:
                allocated[node] = allocated.get(node, 0) + vm.request.memory_bytes
        migrations: dict[tuple[str, str, str], int] = {}
        for key, body in list(self.controller.migrations.cache.items()):
            vm_name = str((body.get("spec") or {}).get("vmName") or "")
            phase = str((body.get("status") or {}).get("phase") or "Pending")
            migrations[(key[0], vm_name, phase)] = migrations.get((key[0], vm_name, phase), 0) + 1
        by_phase = GaugeMetricFamily(
            "virtfleet_vm_migrations",
            "VMMigration objects by VM and phase (Failed ones stay until deleted).",
            labels=["namespace", "name", "phase"],
        )
        for (namespace, vm_name, phase), count in sorted(migrations.items()):
            by_phase.add_metric([namespace, vm_name, phase], count)
        yield by_phase
        vms = GaugeMetricFamily(
            "virtfleet_vms",
            'VirtualMachines by node ("" before placement) and printable status.',
            labels=["node", "phase"],
        )
        for (node, phase), count in sorted(phases.items()):
            vms.add_metric([node, phase], count)
        yield vms
        ready = GaugeMetricFamily(
            "virtfleet_host_ready", "1 while a node's VMHost is Ready.", labels=["node"]
        )
        capacity = GaugeMetricFamily(
            "virtfleet_host_memory_capacity_bytes",
            "Memory the node offers VMs (its VMHost).",
            labels=["node"],
        )
        used = GaugeMetricFamily(
            "virtfleet_host_memory_allocated_bytes",
            "Memory of the VMs placed on the node (their spec).",
            labels=["node"],
        )
        for name, host in sorted(cache.hosts.items()):
            ready.add_metric([name], 1 if host.ready else 0)
            if host.memory_bytes is not None:
                capacity.add_metric([name], host.memory_bytes)
            used.add_metric([name], allocated.get(name, 0))
        yield ready
        yield capacity
        yield used


def _is_ready(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
        if isinstance(c, Mapping)
    )


INFO_HELP = "1 per VirtualMachine, with its node and printable status."
READY_HELP = (
    "1 while a VirtualMachine's Ready condition is True (a VM stopped on purpose is Ready)."
)


def render_vm_series(vms: Sequence[CachedVm]) -> bytes:
    """``virtfleet_vm_info`` and ``virtfleet_vm_ready`` as prometheus_client would write
    them (labels sorted, Go floats; a unit test compares)."""
    info = [
        f"# HELP virtfleet_vm_info {escape_help(INFO_HELP)}\n",
        "# TYPE virtfleet_vm_info gauge\n",
    ]
    ready = [
        f"# HELP virtfleet_vm_ready {escape_help(READY_HELP)}\n",
        "# TYPE virtfleet_vm_ready gauge\n",
    ]
    for vm in vms:
        node = escape_label(vm.labels.get(NODE_LABEL, ""))
        phase = escape_label(str(vm.status.get("printableStatus") or "Pending"))
        labels = (
            f'name="{escape_label(vm.name)}",namespace="{escape_label(vm.namespace)}",node="{node}"'
        )
        info.append(f'virtfleet_vm_info{{{labels},phase="{phase}"}} 1.0\n')
        ready.append(f"virtfleet_vm_ready{{{labels}}} {'1.0' if _is_ready(vm.status) else '0.0'}\n")
    return "".join(info + ready).encode()
