"""The per-VM usage series (KubeVirt's shapes), written as Prometheus text once per snapshot.

A node with 1,000 VMs exports ~40,000 usage samples. Through prometheus_client's
collector → ``generate_latest`` path they cost ~0.9 s of CPU per scrape on these
machines (``bench/scenarios/metrics_cost.py``), on the agent's event loop, and again for
every scraper. The snapshot only changes once per collection interval, so its text is
rendered once per snapshot, by this module, with each VM's label set escaped once; a
scrape copies bytes. The output is the text exposition format 0.0.4 exactly as
``generate_latest`` writes it (labels sorted, values as Go floats), which a unit test
checks against prometheus_client itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from virtfleet.domain.stats import BlockUsage, DomainUsage, NetUsage
from virtfleet.runtime.metrics import escape_help, escape_label, go_float

__all__ = ["USAGE_FAMILIES", "UsageFamily", "VmUsage", "render_usage"]


@dataclass(frozen=True)
class VmUsage:
    namespace: str
    name: str
    usage: DomainUsage


@dataclass(frozen=True)
class UsageFamily:
    """One exported family: its sample name, type, help, and the field it reads."""

    name: str
    kind: str  # "counter" | "gauge"
    doc: str
    field: str
    #: "" (per VM), "drive" (per disk) or "interface" (per NIC): the extra label.
    device: str = ""


def _c(name: str, doc: str, field: str, device: str = "") -> UsageFamily:
    return UsageFamily(name, "counter", doc, field, device)


def _g(name: str, doc: str, field: str) -> UsageFamily:
    return UsageFamily(name, "gauge", doc, field)


USAGE_FAMILIES: Final = (
    _c("virtfleet_vm_cpu_usage_seconds_total", "CPU time the VM used.", "cpu_seconds"),
    _c("virtfleet_vm_cpu_user_usage_seconds_total", "CPU time in user mode.", "cpu_user_seconds"),
    _c(
        "virtfleet_vm_cpu_system_usage_seconds_total",
        "CPU time in kernel mode.",
        "cpu_system_seconds",
    ),
    _g("virtfleet_vm_vcpus", "vCPUs the VM has now.", "vcpus"),
    _g(
        "virtfleet_vm_memory_resident_bytes",
        "Host memory the VM's QEMU holds.",
        "memory_resident_bytes",
    ),
    _g(
        "virtfleet_vm_memory_domain_bytes", "Memory the guest has (balloon).", "memory_domain_bytes"
    ),
    _g(
        "virtfleet_vm_memory_available_bytes",
        "Memory the guest sees (its agent/balloon).",
        "memory_available_bytes",
    ),
    _g(
        "virtfleet_vm_memory_unused_bytes", "Memory the guest leaves unused.", "memory_unused_bytes"
    ),
    _c("virtfleet_vm_storage_read_traffic_bytes_total", "Bytes read.", "read_bytes", "drive"),
    _c("virtfleet_vm_storage_write_traffic_bytes_total", "Bytes written.", "write_bytes", "drive"),
    _c("virtfleet_vm_storage_iops_read_total", "Reads.", "read_requests", "drive"),
    _c("virtfleet_vm_storage_iops_write_total", "Writes.", "write_requests", "drive"),
    _c("virtfleet_vm_storage_flush_requests_total", "Flushes.", "flush_requests", "drive"),
    _c(
        "virtfleet_vm_storage_read_times_seconds_total",
        "Time spent reading.",
        "read_seconds",
        "drive",
    ),
    _c(
        "virtfleet_vm_storage_write_times_seconds_total",
        "Time spent writing.",
        "write_seconds",
        "drive",
    ),
    _c(
        "virtfleet_vm_storage_flush_times_seconds_total",
        "Time spent flushing.",
        "flush_seconds",
        "drive",
    ),
    _c("virtfleet_vm_network_receive_bytes_total", "Bytes received.", "receive_bytes", "interface"),
    _c("virtfleet_vm_network_transmit_bytes_total", "Bytes sent.", "transmit_bytes", "interface"),
    _c(
        "virtfleet_vm_network_receive_packets_total",
        "Packets received.",
        "receive_packets",
        "interface",
    ),
    _c(
        "virtfleet_vm_network_transmit_packets_total",
        "Packets sent.",
        "transmit_packets",
        "interface",
    ),
    _c(
        "virtfleet_vm_network_receive_errors_total",
        "Receive errors.",
        "receive_errors",
        "interface",
    ),
    _c(
        "virtfleet_vm_network_transmit_errors_total",
        "Transmit errors.",
        "transmit_errors",
        "interface",
    ),
    _c(
        "virtfleet_vm_network_receive_packets_dropped_total",
        "Received, dropped.",
        "receive_drops",
        "interface",
    ),
    _c(
        "virtfleet_vm_network_transmit_packets_dropped_total",
        "To send, dropped.",
        "transmit_drops",
        "interface",
    ),
)


def render_usage(snapshot: Sequence[VmUsage], node: str) -> bytes:
    """Every usage family of ``snapshot`` as Prometheus text (families without a sample
    still say HELP and TYPE, as prometheus_client does)."""
    # Sorted label order, as prometheus_client writes it: drive/interface < name < namespace < node.
    vm_labels = [
        (
            f'name="{escape_label(vm.name)}",namespace="{escape_label(vm.namespace)}",node="{escape_label(node)}"',
            vm,
        )
        for vm in snapshot
    ]
    out: list[str] = []
    for family in USAGE_FAMILIES:
        # prometheus_client names a counter family without _total and writes it back.
        out.append(f"# HELP {family.name} {escape_help(family.doc)}\n")
        out.append(f"# TYPE {family.name} {family.kind}\n")
        prefix = family.name + "{"
        for labels, vm in vm_labels:
            devices: tuple[BlockUsage, ...] | tuple[NetUsage, ...]
            if not family.device:
                value = getattr(vm.usage, family.field)
                if value is not None:
                    out.append(f"{prefix}{labels}}} {go_float(value)}\n")
                continue
            devices = vm.usage.blocks if family.device == "drive" else vm.usage.nets
            for device in devices:
                value = getattr(device, family.field)
                out.append(
                    f'{prefix}{family.device}="{escape_label(device.name)}",{labels}}} '
                    f"{go_float(value)}\n"
                )
    return "".join(out).encode()
