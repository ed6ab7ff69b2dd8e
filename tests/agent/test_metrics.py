"""The agent's /metrics text: usage from the snapshot (no libvirt call per scrape), VMs
by phase, and the bookkeeping of device names per run of a domain."""

from __future__ import annotations

from typing import Any, cast

from virtfleet.agent.agent import Agent
from virtfleet.agent.metrics import AgentMetrics, VmUsage
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineStatus
from virtfleet.domain.stats import BlockUsage, DomainUsage, NetUsage
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor.stats import DomainStats
from virtfleet.runtime.kubeapi import KubeApi


def vm(uid: str, name: str, phase: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "uid": uid,
            "resourceVersion": "1",
            "labels": {"virtfleet.io/node": "node-a"},
        },
        "spec": {"memory": {"size": "64Mi"}},
        "status": {"nodeName": "node-a", "printableStatus": phase},
    }


async def test_usage_and_phases_are_exposed_with_spec_names(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    agent.on_vm_event("ADDED", vm("u1", "web", "Running"))
    agent.on_vm_event("ADDED", vm("u2", "db", "Stopped"))
    metrics = AgentMetrics(agent, 15.0)
    metrics.snapshot = [
        VmUsage(
            "ns",
            "web",
            DomainUsage(
                cpu_seconds=12.5,
                memory_resident_bytes=2048,
                blocks=(BlockUsage("data", write_bytes=4096),),
                nets=(NetUsage("lan", receive_bytes=10),),
            ),
        )
    ]
    text = metrics.exposition().decode()
    web = 'name="web",namespace="ns",node="node-a"'
    assert f"virtfleet_vm_cpu_usage_seconds_total{{{web}}} 12.5" in text
    assert f"virtfleet_vm_memory_resident_bytes{{{web}}} 2048.0" in text
    assert f'virtfleet_vm_storage_write_traffic_bytes_total{{drive="data",{web}}} 4096.0' in text
    assert f'virtfleet_vm_network_receive_bytes_total{{interface="lan",{web}}} 10.0' in text
    assert "virtfleet_vm_memory_available_bytes{" not in text  # unsaid, not zero
    assert 'virtfleet_node_vms{node="node-a",phase="Running"} 1.0' in text
    assert 'virtfleet_node_vms{node="node-a",phase="Stopped"} 1.0' in text
    assert 'virtfleet_workqueue_depth{queue="vms"}' in text
    assert "uid" not in text.replace("guid", "")


async def test_one_bulk_call_per_refresh_and_names_once_per_run(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    agent.on_vm_event("ADDED", vm("u1", "web", "Running"))
    metrics = AgentMetrics(agent, 15.0)
    calls: list[str] = []
    run = [1]

    async def domain_stats() -> list[DomainStats]:
        calls.append("stats")
        return [
            DomainStats("u1", run[0], {"cpu.time": 1_000_000_000}),
            DomainStats("foreign", 9, {"cpu.time": 5}),  # not this agent's VM: ignored
        ]

    async def lookup(uuid: str) -> Any:
        calls.append(f"lookup {uuid}")
        return None

    agent.hv.domain_stats = domain_stats  # type: ignore[method-assign]
    agent.hv.lookup = lookup  # type: ignore[method-assign]
    await metrics.refresh()
    await metrics.refresh()
    assert [v.name for v in metrics.snapshot] == ["web"]
    assert metrics.snapshot[0].usage.cpu_seconds == 1.0
    # No names read (lookup found nothing): asked again next time, never cached as empty.
    assert calls == ["stats", "lookup u1", "stats", "lookup u1"]
    assert metrics.tracked == 0


async def test_time_from_creation_to_first_running_is_observed_once(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    metrics = AgentMetrics(agent, 15.0)
    created = {"creationTimestamp": "2026-01-01T00:00:00Z"}
    running = VirtualMachineStatus(
        printable_status=PrintableStatus.RUNNING, last_start_time="2026-01-01T00:00:02Z"
    )
    metrics.status_written(
        {"metadata": created, "status": {"printableStatus": "Starting"}}, running
    )
    # Not a first start: already running (an agent restart), stopped before, restarted.
    metrics.status_written({"metadata": created, "status": {"printableStatus": "Running"}}, running)
    metrics.status_written({"metadata": created, "status": {"printableStatus": "Stopped"}}, running)
    again = running.model_copy(update={"restart_count": 1})
    metrics.status_written({"metadata": created, "status": {"printableStatus": "Starting"}}, again)
    text = metrics.exposition().decode()
    series = 'node="node-a",phase="Running"'
    assert f"virtfleet_vm_phase_transition_time_from_creation_seconds_count{{{series}}} 1.0" in text
    assert f"virtfleet_vm_phase_transition_time_from_creation_seconds_sum{{{series}}} 2.0" in text


async def test_a_new_snapshot_replaces_the_rendered_usage(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    metrics = AgentMetrics(agent, 15.0)
    cpu = b'virtfleet_vm_cpu_usage_seconds_total{name="web",namespace="ns",node="node-a"}'
    metrics.snapshot = [VmUsage("ns", "web", DomainUsage(cpu_seconds=1.0))]
    assert cpu + b" 1.0\n" in metrics.exposition()
    metrics.snapshot = [VmUsage("ns", "web", DomainUsage(cpu_seconds=2.0))]
    text = metrics.exposition()
    assert cpu + b" 2.0\n" in text
    assert cpu + b" 1.0\n" not in text
