"""Fenced failover on the real system: a node powered off or cut off, its HA VMs started
on the other node — and never two copies writing one disk (docs/failover.md).

Proved from the outside: the guests' serial consoles (boot marker, the disk counter:
it continues, never goes back, never forks), ``virsh`` on the nodes (the stale copy
gone), ``kubectl get`` (VM status, VMHost health) and Events.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import nodes as hn
from harness import operators
from harness.backups import BOOT, backup, backup_done, counts, location, virsh
from harness.failover import (
    events,
    freeze_watchdog,
    host_health,
    power_off,
    power_on,
    restore_nodes,
    thaw_watchdog,
)
from harness.guest import BOOT_MARKER, guest_cmdline
from harness.relay import Relay
from harness.testing import Cluster, condition, domain_name, domains, vm_manifest, wait_for

SHARED_DATA = [{"name": "data", "size": "16Mi", "source": {"blank": {}}, "pool": hn.SHARED_POOL}]
LOCAL_DATA = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]
#: The harness agents' defaults: Lease 10 s, self-fence 10 s, watchdog 10 s (+2 s margin).
FENCE_AFTER_S = 22


@pytest.fixture(autouse=True)
def nodes_healthy_after(system: Cluster) -> Iterator[None]:
    """The tests after these find every node back and out of its damping."""
    yield
    restore_nodes(system)


def ha_vm(
    system: Cluster,
    namespace: str,
    name: str,
    policy: str,
    disks: list[dict[str, Any]],
    **spec: Any,
) -> tuple[hn.Node, hn.Node]:
    """A counting guest with ``policy``, Running; returns (its node, the other node)."""
    system.apply(
        vm_manifest(
            name, namespace, cmdline=guest_cmdline(counter=True), disks=disks,
            highAvailability=policy, **spec,
        )
    )  # fmt: skip
    node = wait_for(lambda: _running_on(system, namespace, name), 90, what=f"{name} Running")
    src = system.node(node)
    hn.wait_for_serial(src, domain_name(namespace, name), r"^VF-COUNTER 3\s*$", timeout=90)
    return src, next(n for n in system.nodes if n.name != node)


def _running_on(system: Cluster, namespace: str, name: str) -> str | None:
    st = system.get("vm", name, namespace).get("status") or {}
    return st.get("nodeName") if st.get("printableStatus") == "Running" else None


def booted_on(node: hn.Node, dom: str, timeout: float) -> int:
    return int(hn.wait_for_serial(node, dom, BOOT, timeout=timeout).group(1))


def test_power_off_restarts_ha_vms_on_the_other_node_and_the_return_removes_the_stale_copy(
    system: Cluster, namespace: str
) -> None:
    src, dst = ha_vm(system, namespace, "phoenix", "Restart", SHARED_DATA)
    # On the same node: a VM without HA (it waits for its node) and an HA VM whose
    # nodeSelector only that node matches (it fits nowhere else: it waits, saying why).
    system.apply(vm_manifest("plain", namespace, nodeName=src.name))
    system.apply(
        vm_manifest(
            "resting", namespace, runStrategy="Halted", highAvailability="Restart",
            nodeSelector={"kubernetes.io/hostname": src.name},
        )
    )  # fmt: skip
    wait_for(lambda: _running_on(system, namespace, "plain"), 90, what="plain Running")
    wait_for(
        lambda: (
            (system.get("vm", "resting", namespace).get("status") or {}).get("printableStatus")
            == "Stopped"
        ),
        60,
        what="resting Stopped",
    )
    dom = domain_name(namespace, "phoenix")
    volume = f"{system.get('vm', 'phoenix', namespace)['metadata']['uid']}-data.qcow2"

    cut = power_off(system, src)
    last_on_src = max(counts(src, dom))
    boot = booted_on(dst, dom, timeout=90)
    elapsed = time.monotonic() - cut
    print(
        f"\n[failover] power-off of {src.name} → boot marker on {dst.name}: {elapsed:.1f}s; "
        f"counter {last_on_src} on {src.name}, booted at {boot}"
    )
    # The disk counter continues from its last value (written and fsynced before printed).
    assert boot >= last_on_src, (boot, last_on_src)
    hn.wait_for_serial(dst, dom, rf"^VF-COUNTER {boot + 2}\s*$", timeout=60)

    vm = system.get("vm", "phoenix", namespace)
    st = vm["status"]
    assert st["nodeName"] == dst.name
    assert st["failover"]["fromNode"] == src.name
    assert st["failover"]["toNode"] == dst.name
    assert st["failover"]["policy"] == "Restart"
    failed_over = condition(vm, "FailedOver")
    assert failed_over is not None
    assert failed_over["status"] == "True"
    assert src.name in failed_over["message"]
    assert dst.name in failed_over["message"]
    assert vm["metadata"]["labels"]["virtfleet.io/node"] == dst.name
    assert f"virtfleet.io/agent-{src.name}" not in vm["metadata"].get("finalizers", [])
    assert events(system, namespace, "phoenix", "FailedOver")
    assert host_health(system, src.name)["state"] == "Fenced"
    assert events(system, None, src.name, "NodeFenced")
    # No HA: it waits for its node, Unknown. Fits nowhere else: waits with the reason.
    plain = system.get("vm", "plain", namespace)["status"]
    assert plain["nodeName"] == src.name
    assert plain["printableStatus"] == "Unknown"
    (waiting,) = wait_for(
        lambda: events(system, namespace, "resting", "FailoverWaiting"), 30, what="resting waits"
    )
    assert "nodeSelector" in waiting["message"], waiting["message"]
    assert system.get("vm", "resting", namespace)["status"]["nodeName"] == src.name

    power_on(system, src)
    wait_for(lambda: dom not in domains(src), 90, what="the stale copy on the returned node to go")
    wait_for(
        lambda: host_health(system, src.name).get("state") in ("Recovering", "Healthy"),
        60,
        what=f"{src.name} recovering",
    )
    assert events(system, namespace, "phoenix", "StaleCopyRemoved")
    # Nothing else changed: the shared disk is there, the guest on dst counts on, the
    # VM without HA runs again on its node.
    assert volume in virsh(dst, "vol-list", hn.SHARED_POOL)
    after = max(counts(dst, dom))
    hn.wait_for_serial(dst, dom, rf"^VF-COUNTER {after + 1}\s*$", timeout=30)
    assert hn.serial_log(dst, dom).count("VF-COUNTER-BOOT") == 1
    wait_for(lambda: _running_on(system, namespace, "plain") == src.name, 90, what="plain back")
    assert system.get("vm", "phoenix", namespace)["status"]["nodeName"] == dst.name


def test_a_cut_off_node_is_fenced_by_its_watchdog_and_a_lease_refuses_a_second_copy(
    system: Cluster, namespace: str
) -> None:
    """The agent of the VM's node dies while its QEMU runs on. First with the node's
    watchdog frozen (it fails): the controller's deadline passes, it moves the VM, and the
    other node's start is refused by the disk's lock while the old copy writes — the
    counter never forks. Then the watchdog fires, the old copy dies, the new one boots."""
    src, dst = ha_vm(system, namespace, "lonely", "Restart", SHARED_DATA)
    dom = domain_name(namespace, "lonely")
    freeze_watchdog(src)
    try:
        operators.kill(system.state_dir, f"agent-{src.name}")
        cut = time.monotonic()

        def refused() -> bool:
            return bool(events(system, namespace, "lonely", "DiskLocked"))

        wait_for(refused, FENCE_AFTER_S + 60, 1.0, "the new node's start refused by the lock")
        print(
            f"\n[failover] lock refusal on {dst.name} {time.monotonic() - cut:.1f}s after the cut"
        )
        vm = system.get("vm", "lonely", namespace)
        assert vm["status"]["nodeName"] == dst.name
        # The old copy still runs and counts; no copy booted on the new node.
        running = max(counts(src, dom))
        hn.wait_for_serial(src, dom, rf"^VF-COUNTER {running + 2}\s*$", timeout=30)
        assert not re.search(BOOT, hn.serial_log(dst, dom) if dom in domains(dst) else "")
    finally:
        thaw_watchdog(src)
    boot = booted_on(dst, dom, timeout=60)
    last_on_src = max(counts(src, dom))
    print(f"[failover] watchdog fired; counter {last_on_src} on {src.name}, booted at {boot}")
    assert boot >= last_on_src, (boot, last_on_src)
    assert virsh(src, "domstate", dom).strip() == "shut off"

    operators.start_agent(system.state_dir, system.env, src)
    wait_for(lambda: dom not in domains(src), 90, what="the stale copy to go")
    hn.wait_for_serial(dst, dom, rf"^VF-COUNTER {boot + 2}\s*$", timeout=60)


def test_restore_from_backup_brings_the_vm_back_from_its_latest_backup_and_quarantines_its_disk(
    system: Cluster, namespace: str, bucket: str
) -> None:
    location(system, namespace, bucket)
    src, dst = ha_vm(system, namespace, "keeper", "RestoreFromBackup", LOCAL_DATA)
    dom = domain_name(namespace, "keeper")
    before = max(counts(src, dom))
    backup(system, namespace, "keeper-1", "keeper")
    done = backup_done(system, namespace, "keeper-1")
    after = max(counts(src, dom))
    assert done["status"]["phase"] == "Completed"
    hn.wait_for_serial(src, dom, rf"^VF-COUNTER {after + 3}\s*$", timeout=60)
    uid = system.get("vm", "keeper", namespace)["metadata"]["uid"]

    cut = power_off(system, src)
    boot = booted_on(dst, dom, timeout=120)
    print(
        f"\n[failover] RestoreFromBackup: boot on {dst.name} {time.monotonic() - cut:.1f}s "
        f"after the power-off; counter {before}..{after} at the backup, booted at {boot}"
    )
    # The disk is the backup's: what the guest wrote after it is not there (the RPO).
    assert before <= boot <= after, (before, boot, after)
    st = system.get("vm", "keeper", namespace)["status"]
    assert st["failover"]["policy"] == "RestoreFromBackup"
    assert st["failover"]["backupName"] == "keeper-1"
    assert st["failover"]["rpoSeconds"] >= 0
    assert "RPO" in condition(system.get("vm", "keeper", namespace), "FailedOver")["message"]  # type: ignore[index]

    power_on(system, src)
    quarantined = f"quarantined-{uid}-f1-data.qcow2"

    def listed() -> list[dict[str, Any]]:
        vols = (system.get("vmhost", src.name).get("status") or {}).get("quarantinedVolumes")
        return [v for v in vols or [] if v["volume"] == quarantined]

    (entry,) = wait_for(listed, 90, what="the quarantined disk listed on the VMHost")
    assert entry["uid"] == uid
    assert entry["pool"] == hn.LOCAL_POOL
    assert dom not in domains(src)
    assert events(system, namespace, "keeper", "DisksQuarantined")
    assert f"{uid}-data.qcow2" not in virsh(src, "vol-list", hn.LOCAL_POOL).split()
    # Kept until a person deletes it.
    system.kubectl("annotate", "vmhost", src.name, f"virtfleet.io/delete-quarantined={quarantined}")
    wait_for(lambda: not listed(), 60, what="the quarantined disk deleted on request")
    assert quarantined not in virsh(src, "vol-list", hn.LOCAL_POOL).split()
    hn.wait_for_serial(dst, dom, rf"^VF-COUNTER {boot + 2}\s*$", timeout=60)


def test_an_agent_cut_off_from_the_apiserver_fences_its_ha_vms_itself(
    system: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The agent lives, the apiserver is out of its reach: after its self-fence time it
    destroys its HA VM's domain (and only that: a VM without HA runs on, and the watchdog
    stays quiet); the VM fails over; when the network returns, the agent learns of the
    fence, waits for the controller to clear it, and removes its stale copy."""
    src, dst = ha_vm(system, namespace, "island", "Restart", SHARED_DATA)
    system.apply(vm_manifest("bystander", namespace, nodeName=src.name))
    wait_for(lambda: _running_on(system, namespace, "bystander"), 90, what="bystander Running")
    dom, other = domain_name(namespace, "island"), domain_name(namespace, "bystander")
    hn.wait_for_serial(src, other, r"^VF-UPTIME 2", timeout=60)
    relay = Relay(system.env["KUBE_APISERVER"], netns=src.netns)
    agent = f"agent-{src.name}"
    try:
        kubeconfig = yaml.safe_load(
            Path(system.env[operators.agent_kubeconfig_var(src.name)]).read_text()
        )
        kubeconfig["clusters"][0]["cluster"]["server"] = relay.url
        through_relay = tmp_path / "agent.kubeconfig"
        through_relay.write_text(yaml.safe_dump(kubeconfig))
        operators.kill(system.state_dir, agent)
        operators.start_agent(system.state_dir, system.env, src, kubeconfig=through_relay)
        renewed = lease_renew_time(system, src.name)
        wait_for(lambda: lease_renew_time(system, src.name) != renewed, 60, what="a renewal")

        relay.cut()
        cut = time.monotonic()
        wait_for(lambda: domains(src).get(dom) == "shut off", 30, 0.2, "the self-fence")
        fenced_after = time.monotonic() - cut
        booted = booted_on(dst, dom, timeout=60)
        print(
            f"\n[failover] cut off: self-fenced after {fenced_after:.1f}s, booted on "
            f"{dst.name} {time.monotonic() - cut:.1f}s after the cut (at {booted})"
        )
        assert booted >= max(counts(src, dom))
        # Only the HA VM: the bystander ran on, never reset by the watchdog.
        assert domains(src).get(other) == "running"
        assert hn.serial_log(src, other).count(BOOT_MARKER) == 1

        relay.restore()
        wait_for(lambda: dom not in domains(src), 90, what="the stale copy to go")
        wait_for(
            lambda: host_health(system, src.name).get("state") in ("Recovering", "Healthy"),
            60,
            what=f"{src.name} back",
        )
        assert domains(src).get(other) == "running"
        assert hn.serial_log(src, other).count(BOOT_MARKER) == 1
        hn.wait_for_serial(dst, dom, rf"^VF-COUNTER {booted + 2}\s*$", timeout=60)
    finally:
        relay.close()
        operators.kill(system.state_dir, agent)
        operators.start_agent(system.state_dir, system.env, src)


def lease_renew_time(system: Cluster, node: str) -> str:
    lease = system.get("lease", f"virtfleet-agent-{node}", "kube-node-lease")
    return str(lease["spec"].get("renewTime"))
