"""The operators' metrics, as a real Prometheus scrapes them (``harness.prometheus``).

A guest that writes its counter to its disk every second: PromQL sees its CPU seconds
and its disk's written bytes grow, labelled by namespace, name, node and the spec's
drive name; the fleet's and the operators' own series are there too.
"""

from __future__ import annotations

import re
import time

from harness import prometheus
from harness.guest import guest_cmdline
from harness.testing import Cluster, migration_manifest, vm_manifest, wait_for

DATA_DISK = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]


def grows(expression: str, timeout: float = 90.0) -> tuple[float, float]:
    """(first, later) values of ``expression``, once it has grown."""
    first = wait_for(lambda: prometheus.value(expression), timeout, 1.0, expression)
    later = wait_for(
        lambda: v if (v := prometheus.value(expression)) is not None and v > first else None,
        timeout, 1.0, f"{expression} to grow past {first}",
    )  # fmt: skip
    return first, later


def test_a_guests_cpu_and_disk_writes_reach_prometheus(system: Cluster, namespace: str) -> None:
    node = system.nodes[0]
    system.apply(
        vm_manifest("busy", namespace, nodeName=node.name, disks=DATA_DISK,
                    cmdline=guest_cmdline(counter=True))
    )  # fmt: skip
    vm = f'namespace="{namespace}",name="busy",node="{node.name}"'
    cpu = grows(f"virtfleet_vm_cpu_usage_seconds_total{{{vm}}}")
    written = grows(f'virtfleet_vm_storage_write_traffic_bytes_total{{{vm},drive="data"}}')
    writes = prometheus.value(f'virtfleet_vm_storage_iops_write_total{{{vm},drive="data"}}')
    print(f"\n[metrics] cpu {cpu} s, written {written} bytes, {writes} writes")
    assert writes is not None
    assert writes > 0
    resident = prometheus.value(f"virtfleet_vm_memory_resident_bytes{{{vm}}}")
    assert resident is not None
    assert resident > 16 * 2**20  # a QEMU holds more than this

    # The fleet as the controller and the agent see it, and the operators' own series.
    assert wait_for(
        lambda: prometheus.value(f'virtfleet_vms{{node="{node.name}",phase="Running"}}'),
        30, 1.0, "the controller's count of Running VMs",
    )  # fmt: skip
    assert prometheus.value(f'virtfleet_node_vms{{node="{node.name}",phase="Running"}}')
    assert prometheus.value(f'virtfleet_libvirt_connected{{node="{node.name}"}}') == 1
    reconciles = 'sum(virtfleet_reconcile_duration_seconds_count{job="virtfleet-agent"})'
    assert (prometheus.value(reconciles) or 0) > 0
    born = f'virtfleet_vm_phase_transition_time_from_creation_seconds_count{{node="{node.name}"}}'
    assert (prometheus.value(born) or 0) >= 1
    calls = f'sum(virtfleet_libvirt_call_duration_seconds_count{{node="{node.name}"}})'
    assert (prometheus.value(calls) or 0) > 0
    status_writes = 'sum(virtfleet_apiserver_requests_total{resource="virtualmachines/status"})'
    assert (prometheus.value(status_writes) or 0) > 0
    for job in ("virtfleet-agent", "virtfleet-controller"):
        ups = prometheus.query(f'up{{job="{job}"}}')
        assert ups, job
        assert all(float(s["value"][1]) == 1 for s in ups), ups

    # Quantities for people: `kubectl get vmhost` shows what the node's VMs were given.
    def allocated() -> list[str] | None:
        rows = system.kubectl("get", "vmhost", node.name).stdout.splitlines()
        header, row = rows[0].split(), rows[1].split()
        values = dict(zip(header, row, strict=False))
        return [values["ALLOCATED"], values["MEMORY"], values["FREE"]] if (
            values.get("ALLOCATED") == "128Mi") else None  # fmt: skip

    shown = wait_for(allocated, 60, 1.0, "the VM's 128Mi in `kubectl get vmhost`")
    assert all(re.fullmatch(r"[0-9]+(\.[0-9])?(Ki|Mi|Gi|Ti)", v) for v in shown), shown

    # A throttled live migration: its progress moves in PromQL while it runs, and the
    # source counts its outcome when it ends.
    if len(system.nodes) > 1:
        target = system.nodes[1]
        system.apply(migration_manifest("slowly", namespace, "busy", targetNode=target.name,
                                        policy={"bandwidthMiBps": 4}))  # fmt: skip
        moving = f'namespace="{namespace}",name="busy"'
        remaining = f"virtfleet_vm_migration_data_remaining_bytes{{{moving}}}"
        processed = f"virtfleet_vm_migration_data_processed_bytes{{{moving}}}"
        # libvirt reports what is left once the first pass is planned (0 before that).
        left_before = wait_for(lambda: prometheus.value(remaining) or None, 60, 0.5, remaining)
        before = prometheus.value(processed) or 0.0
        left_after = wait_for(
            lambda: v if (v := prometheus.value(remaining)) and v < left_before else None,
            60, 0.5, f"{remaining} to shrink below {left_before}",
        )  # fmt: skip
        after = prometheus.value(processed)
        print(f"[metrics] migration left {left_before} → {left_after}, moved {before} → {after}")
        assert after is not None
        assert after > before
        done = f'virtfleet_migrations_total{{node="{node.name}",outcome="succeeded"}}'
        assert wait_for(lambda: prometheus.value(done), 180, 1.0, done) >= 1
        assert wait_for(lambda: not prometheus.query(remaining) or None, 30, 1.0, "no job")
        vm = f'namespace="{namespace}",name="busy",node="{target.name}"'
        grows(f"virtfleet_vm_cpu_usage_seconds_total{{{vm}}}")  # on, from the new node

    # Gone with its VM: no series for a deleted VM once the agent's snapshot is fresh.
    system.kubectl("delete", "vm", "busy", "-n", namespace, "--wait=true", "--timeout=120s")
    time.sleep(3 * prometheus.SCRAPE_SECONDS)
    assert wait_for(
        lambda: not prometheus.query(f"virtfleet_vm_cpu_usage_seconds_total{{{vm}}}") or None,
        30, 1.0, "the deleted VM's series to go stale",
    )  # fmt: skip
