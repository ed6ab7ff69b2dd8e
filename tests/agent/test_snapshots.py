"""The agent's snapshot/restore loops on libvirt's test driver, with an in-memory API."""

from __future__ import annotations

from typing import Any

import pytest

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.snapshot.agent import SnapshotAgent
from virtfleet.hypervisor import Hypervisor, snapshots
from virtfleet.identity import NODE_LABEL

VM_UID = "11111111-2222-4333-8444-555555555555"
NODE = "node-a"


@pytest.fixture
async def setup(hv: Hypervisor) -> tuple[Agent, SnapshotAgent, FakeKube]:
    kube = FakeKube()
    settings = AgentSettings(node_name=NODE, serial_log_dir="/serial")
    agent = Agent(settings, hv, kube)
    vm = kube.put(
        "VirtualMachine",
        {
            "metadata": {
                "namespace": "ns",
                "name": "vm",
                "uid": VM_UID,
                "generation": 1,
                "labels": {NODE_LABEL: NODE},
            },
            "status": {"nodeName": NODE},  # placed here by the controller
            "spec": {
                "memory": {"size": "64Mi"},
                "kernel": {"image": "guest-vmlinuz", "cmdline": "console=ttyS0"},
                "disks": [{"name": "data", "size": "16Mi", "source": {"blank": {}}}],
            },
        },
    )
    agent.on_vm_event("ADDED", vm)
    for _ in range(3):
        await agent.reconcile(("ns", "vm"))
    guest = await hv.lookup(VM_UID)
    assert guest is not None
    assert (await guest.status()).state.active
    return agent, SnapshotAgent(agent, VmLocks()), kube


def add(kube: FakeKube, snaps: SnapshotAgent, kind: str, name: str, spec: dict[str, Any]) -> None:
    body = kube.put(
        kind,
        {
            "metadata": {
                "namespace": "ns",
                "name": name,
                "uid": f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": spec,
        },
    )
    if kind == "VMSnapshot":
        snaps.on_snapshot_event("ADDED", body)
    else:
        snaps.on_restore_event("ADDED", body)


async def test_snapshot_restore_redefine_delete(
    setup: tuple[Agent, SnapshotAgent, FakeKube], hv: Hypervisor
) -> None:
    _, snaps, kube = setup
    add(kube, snaps, "VMSnapshot", "s1", {"vmName": "vm"})
    await snaps.reconcile_snapshot(("ns", "s1"))
    body = await kube.get("VMSnapshot", "ns", "s1")
    status = body["status"]
    assert status["phase"] == "Ready"
    assert status["readyToUse"] is True
    assert status["memoryIncluded"] is True
    assert status["vmUID"] == VM_UID
    assert status["snapshotXML"].startswith("<domainsnapshot")
    assert status["disks"][0]["name"] == "data"
    assert body["metadata"]["finalizers"] == [f"virtfleet.io/agent-{NODE}"]
    assert body["metadata"]["labels"][NODE_LABEL] == NODE
    assert body["metadata"]["ownerReferences"][0]["uid"] == VM_UID
    name = status["snapshotName"]
    guest = await hv.lookup(VM_UID)
    assert guest is not None
    assert [s.name for s in await snapshots.list_snapshots(guest)] == [name]

    # Taking it again is a no-op: the name is derived from the uid.
    await snaps.reconcile_snapshot(("ns", "s1"))
    assert [s.name for s in await snapshots.list_snapshots(guest)] == [name]

    add(kube, snaps, "VMRestore", "r1", {"vmName": "vm", "snapshotName": "s1"})
    await snaps.reconcile_restores(("ns", "vm"))
    restored = (await kube.get("VMRestore", "ns", "r1"))["status"]
    assert restored["phase"] == "Succeeded"
    assert restored["memoryRestored"] is True
    assert await snapshots.restore_marker(guest) is None
    assert ("r1", "Restored") in kube.events

    # libvirt forgets the snapshot (test driver: delete); the agent redefines it.
    await snapshots.delete(guest, name)
    await snaps.reconcile_snapshot(("ns", "s1"))
    assert [s.name for s in await snapshots.list_snapshots(guest)] == [name]
    assert ("s1", "SnapshotRedefined") in kube.events

    # Deleting the VMSnapshot deletes the libvirt snapshot and releases the finalizer.
    deleting = await kube.patch(
        "VMSnapshot", "ns", "s1", {"metadata": {"deletionTimestamp": "2026-01-01T00:01:00Z"}}
    )
    snaps.on_snapshot_event("MODIFIED", deleting)
    await snaps.reconcile_snapshot(("ns", "s1"))
    assert await snapshots.list_snapshots(guest) == []
    assert snaps.finalized[("ns", "s1")].is_set()


async def test_interrupted_restore_reverts_once(
    setup: tuple[Agent, SnapshotAgent, FakeKube], hv: Hypervisor
) -> None:
    _, snaps, kube = setup
    add(kube, snaps, "VMSnapshot", "s1", {"vmName": "vm"})
    await snaps.reconcile_snapshot(("ns", "s1"))
    name = (await kube.get("VMSnapshot", "ns", "s1"))["status"]["snapshotName"]
    guest = await hv.lookup(VM_UID)
    assert guest is not None

    # The agent died after storing the commitment and marking the domain: it reverts now.
    add(kube, snaps, "VMRestore", "r1", {"vmName": "vm", "snapshotName": "s1"})
    uid = snaps.restores[("ns", "r1")]["metadata"]["uid"]
    await snapshots.set_restore_marker(guest, uid)
    committed = await kube.patch_status(
        "VMRestore",
        "ns",
        "r1",
        {"phase": "InProgress", "snapshotName": name, "vmUID": VM_UID, "memoryRestored": True},
    )
    snaps.on_restore_event("MODIFIED", committed)
    await snaps.reconcile_restores(("ns", "vm"))
    assert (await kube.get("VMRestore", "ns", "r1"))["status"]["phase"] == "Succeeded"
    assert await snapshots.restore_marker(guest) is None

    # Died after the revert (marker gone) but another snapshot is current: fail, no revert.
    add(kube, snaps, "VMSnapshot", "s2", {"vmName": "vm"})
    await snaps.reconcile_snapshot(("ns", "s2"))
    add(kube, snaps, "VMRestore", "r2", {"vmName": "vm", "snapshotName": "s1"})
    committed = await kube.patch_status(
        "VMRestore",
        "ns",
        "r2",
        {"phase": "InProgress", "snapshotName": name, "vmUID": VM_UID, "memoryRestored": True},
    )
    snaps.on_restore_event("MODIFIED", committed)
    before = await snapshots.current(guest)
    await snaps.reconcile_restores(("ns", "vm"))
    status = (await kube.get("VMRestore", "ns", "r2"))["status"]
    assert status["phase"] == "Failed"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Stalled"] == "Interrupted"
    assert await snapshots.current(guest) == before  # not reverted


async def test_restore_of_a_not_ready_snapshot_is_refused(
    setup: tuple[Agent, SnapshotAgent, FakeKube],
) -> None:
    _, snaps, kube = setup
    add(kube, snaps, "VMSnapshot", "pending", {"vmName": "vm"})  # never reconciled
    add(kube, snaps, "VMRestore", "r1", {"vmName": "vm", "snapshotName": "pending"})
    add(kube, snaps, "VMRestore", "r2", {"vmName": "vm", "snapshotName": "missing"})
    await snaps.reconcile_restores(("ns", "vm"))
    r1 = (await kube.get("VMRestore", "ns", "r1"))["status"]
    r2 = (await kube.get("VMRestore", "ns", "r2"))["status"]
    assert (r1["phase"], r2["phase"]) == ("Failed", "Failed")
    stalled = [
        next(c["reason"] for c in r["conditions"] if c["type"] == "Stalled") for r in (r1, r2)
    ]
    assert stalled == ["SnapshotNotReady", "SnapshotNotFound"]
    assert "not ready to use" in r1["error"]["message"]


async def test_restore_refused_while_a_migration_is_active(
    setup: tuple[Agent, SnapshotAgent, FakeKube],
) -> None:
    _, snaps, kube = setup
    add(kube, snaps, "VMSnapshot", "s1", {"vmName": "vm"})
    await snaps.reconcile_snapshot(("ns", "s1"))
    kube.put(
        "VMMigration",
        {
            "metadata": {"namespace": "ns", "name": "move"},
            "spec": {"vmName": "vm"},
            "status": {"phase": "Running"},
        },
    )
    add(kube, snaps, "VMRestore", "r1", {"vmName": "vm", "snapshotName": "s1"})
    await snaps.reconcile_restores(("ns", "vm"))
    status = (await kube.get("VMRestore", "ns", "r1"))["status"]
    assert status["phase"] == "Failed"
    assert "move" in status["error"]["message"]
