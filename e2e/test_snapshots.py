"""VMSnapshot and VMRestore on the real system, proved from outside.

The guest tells the truth on its serial console: ``VF-UPTIME`` jumps back when a memory
snapshot is restored, ``VF-COUNTER-BOOT`` shows what its disk held at boot. ``virsh``
on the node shows which libvirt snapshots exist.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from typing import Any

import pytest

from harness import nodes as hn
from harness import operators
from harness.guest import BOOT_MARKER, guest_cmdline
from harness.testing import (
    Cluster,
    condition,
    domain_name,
    snapshot_manifest,
    virsh,
    vm_manifest,
    wait_for,
    wait_phase,
)

UPTIME = re.compile(r"^VF-UPTIME (\d+(?:\.\d+)?)\s*$", re.MULTILINE)
DATA_DISK = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]


def libvirt_snapshots(node: hn.Node, dom: str) -> list[str]:
    out = virsh(node, "snapshot-list", dom, "--name", check=False)
    return [line.strip() for line in out.splitlines() if line.strip()]


def uptimes(node: hn.Node, dom: str, after: int = 0) -> list[float]:
    return [float(m.group(1)) for m in UPTIME.finditer(hn.serial_log(node, dom), after)]


def restore_manifest(name: str, ns: str, vm: str, snapshot: str) -> dict[str, Any]:
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMRestore",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"vmName": vm, "snapshotName": snapshot},
    }


def wait_vm(cluster: Cluster, ns: str, name: str, printable: str, timeout: float = 90) -> None:
    wait_for(
        lambda: (
            (cluster.get("vm", name, ns).get("status") or {}).get("printableStatus") == printable
        ),
        timeout,
        0.2,
        f"vm {ns}/{name} {printable}",
    )


def set_strategy(cluster: Cluster, ns: str, name: str, strategy: str) -> None:
    cluster.kubectl(
        "patch", "vm", name, "-n", ns, "--type=merge", "-p",
        f'{{"spec":{{"runStrategy":"{strategy}"}}}}',
    )  # fmt: skip


def exists(cluster: Cluster, kind: str, ns: str, name: str) -> bool:
    out = cluster.kubectl("get", kind, name, "-n", ns, "-o", "name", check=False)
    return out.returncode == 0


@pytest.fixture
def node_a(system: Cluster) -> hn.Node:
    return system.node("node-a")


def running_vm(system: Cluster, ns: str, node: hn.Node, name: str, **spec: Any) -> str:
    system.apply(vm_manifest(name, ns, nodeName="node-a", **spec))
    wait_vm(system, ns, name, "Running")
    dom = domain_name(ns, name)
    hn.wait_for_serial(node, dom, BOOT_MARKER, timeout=60)
    return dom


def test_memory_snapshot_restore_jumps_uptime_back(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    # Internal snapshots keep the memory state inside a qcow2 disk: the VM needs one.
    dom = running_vm(system, namespace, node_a, "warm", disks=DATA_DISK)
    wait_for(lambda: max(uptimes(node_a, dom), default=0) >= 6, 60, what="uptime 6 s")

    before = max(uptimes(node_a, dom))
    started = time.monotonic()
    system.apply(snapshot_manifest("warm-1", namespace, "warm"))
    snap = wait_phase(system, "vmsnapshot", namespace, "warm-1", ("Ready", "Failed"))
    t_snapshot = time.monotonic() - started
    after = max(uptimes(node_a, dom))
    status = snap["status"]
    assert status["phase"] == "Ready", status
    assert status["readyToUse"] is True
    assert status["memoryIncluded"] is True
    assert status["nodeName"] == "node-a"
    assert status["snapshotName"] == f"vf-{snap['metadata']['uid']}"
    assert [d["name"] for d in status["disks"]] == ["data"]
    assert condition(snap, "Ready")["status"] == "True"  # type: ignore[index]
    assert libvirt_snapshots(node_a, dom) == [status["snapshotName"]]
    assert snap["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachine"

    wait_for(lambda: max(uptimes(node_a, dom)) >= after + 8, 60, what="8 more seconds")
    peak = max(uptimes(node_a, dom))
    offset = len(hn.serial_log(node_a, dom))
    started = time.monotonic()
    system.apply(restore_manifest("back", namespace, "warm", "warm-1"))
    restore = wait_phase(system, "vmrestore", namespace, "back", ("Succeeded", "Failed"))
    t_restore = time.monotonic() - started
    assert restore["status"]["phase"] == "Succeeded", restore["status"]
    assert restore["status"]["memoryRestored"] is True
    assert restore["status"]["complete"] is True

    def since_jump() -> list[float] | None:
        """Uptimes printed from the jump back on (lines printed just before the revert
        can still arrive after the restore reports Succeeded)."""
        values = uptimes(node_a, dom, offset)
        jump = next((i for i, u in enumerate(values) if u < peak - 4), None)
        return values[jump:] if jump is not None else None

    resumed = wait_for(since_jump, 30, what="the uptime to jump back")
    first_after = resumed[0]
    print(
        f"\n[snapshot] uptime before {before:.1f}s, after {after:.1f}s, peak {peak:.1f}s, "
        f"first after restore {first_after:.1f}s"
    )
    assert before - 1 <= first_after <= after + 2, (before, after, first_after)
    assert hn.serial_log(node_a, dom).count(BOOT_MARKER) == 1  # resumed, not rebooted
    wait_for(lambda: (since_jump() or [0.0])[-1] >= first_after + 3, 30, what="keeps running")
    assert system.get("vm", "warm", namespace)["status"]["printableStatus"] == "Running"

    # The same operations with virsh on the same guest, for comparison.
    t0 = time.monotonic()
    virsh(node_a, "snapshot-create-as", dom, "raw-timing")
    t_raw_snapshot = time.monotonic() - t0
    t0 = time.monotonic()
    virsh(node_a, "snapshot-revert", dom, "raw-timing")
    t_raw_revert = time.monotonic() - t0
    virsh(node_a, "snapshot-delete", dom, "raw-timing")
    print(
        f"[timing] snapshot: operator {t_snapshot:.2f}s (apply → Ready) vs virsh "
        f"{t_raw_snapshot:.2f}s; restore: operator {t_restore:.2f}s (apply → Succeeded) "
        f"vs virsh {t_raw_revert:.2f}s"
    )


def test_disks_only_snapshot_of_halted_vm_restores_the_counter(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    name = "count"
    dom = running_vm(
        system, namespace, node_a, name, disks=DATA_DISK, cmdline=guest_cmdline(counter=True)
    )
    hn.wait_for_serial(node_a, dom, r"^VF-COUNTER 3\s*$", timeout=60)
    set_strategy(system, namespace, name, "Halted")
    wait_vm(system, namespace, name, "Stopped")

    system.apply(snapshot_manifest("cold", namespace, name))
    snap = wait_phase(system, "vmsnapshot", namespace, "cold", ("Ready", "Failed"))
    assert snap["status"]["phase"] == "Ready", snap["status"]
    assert snap["status"]["memoryIncluded"] is False
    assert snap["status"]["domainState"] == "shutoff"
    assert [d["name"] for d in snap["status"]["disks"]] == ["data"]
    assert snap["status"]["disks"][0]["sizeBytes"] == 16 * 2**20

    offset = len(hn.serial_log(node_a, dom))
    set_strategy(system, namespace, name, "Always")
    m = hn.wait_for_serial(node_a, dom, r"^VF-COUNTER-BOOT (\d+)\s*$", after=offset)
    at_snapshot = int(m.group(1))
    hn.wait_for_serial(node_a, dom, rf"^VF-COUNTER {at_snapshot + 4}\s*$", after=offset)
    set_strategy(system, namespace, name, "Halted")
    wait_vm(system, namespace, name, "Stopped")

    system.apply(restore_manifest("rewind", namespace, name, "cold"))
    restore = wait_phase(system, "vmrestore", namespace, "rewind", ("Succeeded", "Failed"))
    assert restore["status"]["phase"] == "Succeeded", restore["status"]
    assert restore["status"]["memoryRestored"] is False
    time.sleep(2)
    assert system.get("vm", name, namespace)["status"]["printableStatus"] == "Stopped"

    offset = len(hn.serial_log(node_a, dom))
    set_strategy(system, namespace, name, "Always")
    m = hn.wait_for_serial(node_a, dom, r"^VF-COUNTER-BOOT (\d+)\s*$", after=offset)
    print(f"\n[counter] at snapshot {at_snapshot}, after restore {m.group(1)}")
    assert int(m.group(1)) == at_snapshot


def test_restore_refusals_have_reasons(system: Cluster, namespace: str, node_a: hn.Node) -> None:
    # No qcow2 disk: nowhere to keep a running VM's internal snapshot (memory included),
    # so libvirt refuses it and the snapshot fails.
    running_vm(system, namespace, node_a, "one")
    system.apply(
        vm_manifest("two", namespace, nodeName="node-a", runStrategy="Halted", disks=DATA_DISK)
    )
    wait_vm(system, namespace, "two", "Stopped")
    system.apply(snapshot_manifest("never", namespace, "one"))
    failed = wait_phase(system, "vmsnapshot", namespace, "never", ("Ready", "Failed"))
    assert failed["status"]["phase"] == "Failed"
    assert condition(failed, "Stalled")["status"] == "True"  # type: ignore[index]
    system.apply(snapshot_manifest("of-two", namespace, "two"))
    wait_phase(system, "vmsnapshot", namespace, "of-two", ("Ready",))

    cases = {
        "not-ready": ("never", "SnapshotNotReady"),
        "not-found": ("nothing", "SnapshotNotFound"),
        "other-vm": ("of-two", "SnapshotOfAnotherVM"),
    }
    for restore, (snapshot, _) in cases.items():
        system.apply(restore_manifest(restore, namespace, "one", snapshot))
    for restore, (_, reason) in cases.items():
        obj = wait_phase(system, "vmrestore", namespace, restore, ("Failed", "Succeeded"))
        stalled = condition(obj, "Stalled")
        assert obj["status"]["phase"] == "Failed"
        assert stalled is not None
        assert stalled["reason"] == reason, (restore, stalled)
        assert obj["status"]["error"]["message"]
        print(f"\n[refused] {restore}: {stalled['reason']}: {stalled['message']}")


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_agent_killed_during_snapshot_and_restore(
    system: Cluster, namespace: str, node_a: hn.Node, delay: float
) -> None:
    dom = running_vm(system, namespace, node_a, "crashy", disks=DATA_DISK)
    wait_for(lambda: max(uptimes(node_a, dom), default=0) >= 4, 60, what="uptime 4 s")

    system.apply(snapshot_manifest("s", namespace, "crashy"))
    time.sleep(delay)
    operators.kill(system.state_dir, "agent-node-a", signal.SIGKILL)
    operators.start_agent(system.state_dir, system.env, node_a)
    snap = wait_phase(system, "vmsnapshot", namespace, "s", ("Ready", "Failed"), timeout=120)
    assert snap["status"]["phase"] == "Ready", snap["status"]
    assert libvirt_snapshots(node_a, dom) == [snap["status"]["snapshotName"]]

    taken_at = max(uptimes(node_a, dom))
    wait_for(lambda: max(uptimes(node_a, dom)) >= taken_at + 6, 60, what="6 more seconds")
    offset = len(hn.serial_log(node_a, dom))
    last_before = uptimes(node_a, dom)[-1]
    system.apply(restore_manifest("r", namespace, "crashy", "s"))
    time.sleep(delay * 4)
    operators.kill(system.state_dir, "agent-node-a", signal.SIGKILL)
    operators.start_agent(system.state_dir, system.env, node_a)
    restore = wait_phase(system, "vmrestore", namespace, "r", ("Succeeded", "Failed"), 120)
    time.sleep(4)  # a second revert, if there were one, would show as a second jump back
    seen = [last_before, *uptimes(node_a, dom, offset)]
    jumps = sum(1 for a, b in itertools.pairwise(seen) if b < a - 1)
    print(f"\n[crash {delay}] restore {restore['status']['phase']}, jumps back: {jumps}")
    if restore["status"]["phase"] == "Succeeded":
        assert jumps == 1, seen
    else:
        assert jumps <= 1, seen
        assert condition(restore, "Stalled") is not None
    assert libvirt_snapshots(node_a, dom) == [snap["status"]["snapshotName"]]


def test_deletion_retain_and_lost_metadata(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    dom = running_vm(system, namespace, node_a, "owner", disks=DATA_DISK)
    system.apply(snapshot_manifest("keep", namespace, "owner", deletionPolicy="Retain"))
    system.apply(snapshot_manifest("drop", namespace, "owner"))
    keep = wait_phase(system, "vmsnapshot", namespace, "keep", ("Ready",))
    drop = wait_phase(system, "vmsnapshot", namespace, "drop", ("Ready",))
    keep_name, drop_name = keep["status"]["snapshotName"], drop["status"]["snapshotName"]
    assert sorted(libvirt_snapshots(node_a, dom)) == sorted([keep_name, drop_name])

    # libvirt loses the metadata (the data stays in the disks): the agent redefines it.
    virsh(node_a, "snapshot-delete", dom, drop_name, "--metadata")
    assert drop_name not in libvirt_snapshots(node_a, dom)
    wait_for(
        lambda: drop_name in libvirt_snapshots(node_a, dom), 40, 0.5, what="redefined snapshot"
    )

    system.kubectl("delete", "vmsnapshot", "keep", "drop", "-n", namespace, "--timeout=60s")
    assert libvirt_snapshots(node_a, dom) == [keep_name]  # Retain kept it
    virsh(node_a, "snapshot-delete", dom, keep_name)

    system.apply(snapshot_manifest("last", namespace, "owner"))
    wait_phase(system, "vmsnapshot", namespace, "last", ("Ready",))
    assert len(libvirt_snapshots(node_a, dom)) == 1
    system.kubectl("delete", "vm", "owner", "-n", namespace, "--timeout=60s")
    wait_for(
        lambda: not exists(system, "vmsnapshot", namespace, "last"),
        60,
        0.5,
        what="the VM's snapshots to be garbage-collected",
    )
    assert dom not in virsh(node_a, "list", "--all", "--name")


def test_snapshot_and_restore_of_a_missing_vm_wait_visibly(system: Cluster, namespace: str) -> None:
    """No agent owns these (no VM, no node): the controller says why they wait."""
    system.apply(snapshot_manifest("early", namespace, "later"))
    system.apply(snapshot_manifest("impatient", namespace, "later", failureDeadline="3s"))
    system.apply(restore_manifest("undo-early", namespace, "later", "early"))

    def reason(kind: str, name: str) -> tuple[Any, Any]:
        obj = system.get(kind, name, namespace)
        ready = condition(obj, "Ready") or {}
        return (obj.get("status") or {}).get("phase"), ready.get("reason")

    wait_for(lambda: reason("vmsnapshot", "early") == ("Pending", "VMNotFound"), 30)
    wait_for(lambda: reason("vmrestore", "undo-early") == ("Pending", "VMNotFound"), 30)
    wait_for(lambda: reason("vmsnapshot", "impatient") == ("Failed", "DeadlineExceeded"), 30)

    # The VM arrives (as in a Git sync that applied the snapshot first): its agent takes over.
    system.apply(
        vm_manifest("later", namespace, nodeName="node-a", runStrategy="Halted", disks=DATA_DISK)
    )
    wait_for(lambda: reason("vmsnapshot", "early")[0] == "Ready", 90, what="snapshot taken")
    assert reason("vmsnapshot", "impatient")[0] == "Failed"  # a failed snapshot stays failed
