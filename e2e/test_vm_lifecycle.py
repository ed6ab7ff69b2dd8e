"""VirtualMachine lifecycle on the real system: agents on two libvirt nodes + controller.

Each test proves behaviour from the outside: ``kubectl`` output, the guest's serial
console, and ``virsh`` on the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any
from xml.etree import ElementTree

import pytest

from harness import nodes as hn
from harness import operators
from harness.guest import BOOT_MARKER, guest_cmdline
from harness.testing import (
    Cluster,
    condition,
    domain_name,
    domains,
    virsh,
    vm_manifest,
    wait_for,
)


def volumes(node: hn.Node, uid: str) -> list[str]:
    found = []
    for pool in (hn.LOCAL_POOL, hn.SHARED_POOL):
        found += [
            line.split()[0]
            for line in virsh(node, "vol-list", pool).splitlines()
            if line.strip().startswith(uid)
        ]
    return found


def vm(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return cluster.get("vm", name, ns)


def wait_status(
    cluster: Cluster, ns: str, name: str, printable: str, timeout: float = 90
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = vm(cluster, ns, name)
        return obj if (obj.get("status") or {}).get("printableStatus") == printable else None

    result: dict[str, Any] = wait_for(check, timeout, 0.2, f"{ns}/{name} to be {printable}")
    return result


def events(cluster: Cluster, ns: str, name: str) -> list[str]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    ).stdout
    return [e["reason"] for e in json.loads(out)["items"]]


@pytest.fixture
def node_a(system: Cluster) -> hn.Node:
    return system.node("node-a")


def test_apply_runs_the_guest_and_kubectl_says_so(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    started = time.monotonic()
    system.apply(vm_manifest("first", namespace, nodeName="node-a"))
    obj = wait_status(system, namespace, "first", "Running")
    print(f"\n[timing] apply → Running: {time.monotonic() - started:.2f}s")
    hn.wait_for_serial(node_a, domain_name(namespace, "first"), BOOT_MARKER, timeout=60)
    print(f"[timing] apply → boot marker on the serial console: {time.monotonic() - started:.2f}s")

    system.kubectl("wait", "--for=condition=Ready", "vm/first", "-n", namespace, "--timeout=30s")
    row = system.kubectl("get", "vm", "first", "-n", namespace, "--no-headers").stdout.split()
    assert row[1:4] == ["Running", "node-a", "True"]
    assert obj["status"]["domainUUID"] == obj["metadata"]["uid"]
    assert obj["status"]["observedGeneration"] == 1
    assert domains(node_a)[domain_name(namespace, "first")] == "running"
    assert obj["metadata"]["generation"] == 1  # never written by the operator


def test_halted_vm_is_ready_and_stopped(system: Cluster, namespace: str, node_a: hn.Node) -> None:
    system.apply(vm_manifest("parked", namespace, nodeName="node-a", runStrategy="Halted"))
    wait_status(system, namespace, "parked", "Stopped")
    # The controller already says Stopped (Ready=False, WaitingForAgent) when it places
    # the VM; Ready turns True once the agent has defined the domain.
    system.kubectl("wait", "--for=condition=Ready", "vm/parked", "-n", namespace, "--timeout=30s")
    obj = vm(system, namespace, "parked")
    assert obj["status"]["printableStatus"] == "Stopped"
    assert condition(obj, "Ready")["reason"] == "Stopped"  # type: ignore[index]
    assert domains(node_a)[domain_name(namespace, "parked")] == "shut off"


@pytest.mark.parametrize(
    ("strategy", "restarts"), [("Always", True), ("RerunOnFailure", False), ("Once", False)]
)
def test_guest_powering_itself_off(
    system: Cluster, namespace: str, node_a: hn.Node, strategy: str, restarts: bool
) -> None:
    name = f"off-{strategy.lower()}"
    cmdline = guest_cmdline(poweroff_after=2)
    system.apply(
        vm_manifest(name, namespace, nodeName="node-a", runStrategy=strategy, cmdline=cmdline)
    )
    log = domain_name(namespace, name)
    hn.wait_for_serial(node_a, log, "VF-POWEROFF", timeout=60)
    if restarts:
        obj = wait_for(
            lambda: (vm(system, namespace, name).get("status") or {}).get("restartCount", 0) >= 1,
            60,
            what="a restart",
        )
        assert obj
        wait_for(
            lambda: hn.serial_log(node_a, log).count(BOOT_MARKER) >= 2, 60, what="a second boot"
        )
        assert "Restarted" in events(system, namespace, name)
    else:
        obj = wait_status(system, namespace, name, "Stopped")
        assert condition(obj, "Ready")["status"] == "True"  # type: ignore[index]
        time.sleep(3)
        assert vm(system, namespace, name)["status"].get("restartCount", 0) == 0
        assert hn.serial_log(node_a, log).count(BOOT_MARKER) == 1


def test_drift_is_corrected_and_foreign_domains_left_alone(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    foreign = f"foreign-{namespace}"[:60]
    virsh_define_foreign(node_a, foreign)
    system.apply(vm_manifest("drift", namespace, nodeName="node-a"))
    wait_status(system, namespace, "drift", "Running")
    dom = domain_name(namespace, "drift")

    virsh(node_a, "destroy", dom)
    wait_for(lambda: domains(node_a).get(dom) == "running", 60, what="running again after destroy")
    wait_for(
        lambda: "Restarted" in events(system, namespace, "drift"), 30, what="a Restarted event"
    )

    virsh(node_a, "undefine", dom)  # the running domain becomes transient
    wait_for(
        lambda: "Persistent:     yes" in virsh(node_a, "dominfo", dom), 60, what="defined again"
    )
    wait_for(lambda: "DomainRedefined" in events(system, namespace, "drift"), 30, what="an Event")

    time.sleep(16)  # one resync + orphan sweep of the agent (15 s in the harness)
    assert foreign in domains(node_a), "the agent touched a domain it does not own"
    virsh(node_a, "undefine", foreign)


def virsh_define_foreign(node: hn.Node, name: str) -> None:
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    subprocess.run(
        ["virsh", "-c", node.uri, "define", "/dev/stdin"],
        input=xml,
        text=True,
        check=True,
        capture_output=True,
    )


def test_memory_change_requires_a_restart_applied_at_next_start(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    system.apply(vm_manifest("grow", namespace, nodeName="node-a"))
    wait_status(system, namespace, "grow", "Running")
    dom = domain_name(namespace, "grow")
    hn.wait_for_serial(node_a, dom, BOOT_MARKER, timeout=60)

    system.apply(vm_manifest("grow", namespace, nodeName="node-a", memory={"size": "192Mi"}))

    def restart_required() -> dict[str, Any] | None:
        obj = vm(system, namespace, "grow")
        cond = condition(obj, "RestartRequired")
        return obj if cond and cond["status"] == "True" else None

    obj = wait_for(restart_required, 30, what="RestartRequired")
    assert "memory.size" in condition(obj, "RestartRequired")["message"]  # type: ignore[index]
    assert obj["status"]["observedGeneration"] == 2
    assert hn.serial_log(node_a, dom).count(BOOT_MARKER) == 1  # not restarted by surprise
    assert domains(node_a)[dom] == "running"

    system.kubectl(
        "patch",
        "vm",
        "grow",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"runStrategy":"Halted"}}',
    )
    wait_status(system, namespace, "grow", "Stopped")
    system.kubectl(
        "patch",
        "vm",
        "grow",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"runStrategy":"Always"}}',
    )
    obj = wait_status(system, namespace, "grow", "Running")
    assert "192 MiB" in virsh(node_a, "dominfo", dom).replace("196608 KiB", "192 MiB")
    wait_for(
        lambda: condition(vm(system, namespace, "grow"), "RestartRequired") is None,
        30,
        what="RestartRequired to clear",
    )
    assert vm(system, namespace, "grow")["metadata"]["generation"] == 4  # our three edits only


def test_delete_leaves_nothing_behind(system: Cluster, namespace: str, node_a: hn.Node) -> None:
    system.apply(
        vm_manifest(
            "gone",
            namespace,
            nodeName="node-a",
            disks=[{"name": "data", "size": "16Mi", "source": {"blank": {}}}],
        )
    )
    obj = wait_status(system, namespace, "gone", "Running")
    uid = obj["metadata"]["uid"]
    assert volumes(node_a, uid)
    assert obj["metadata"]["finalizers"] == ["virtfleet.io/agent-node-a"]
    system.kubectl("delete", "vm", "gone", "-n", namespace, "--timeout=60s")
    assert domain_name(namespace, "gone") not in domains(node_a)
    assert volumes(node_a, uid) == []


def test_invalid_vms_are_refused_or_stalled(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    bad = vm_manifest("bad-field", namespace, memory={"size": "lots"})
    refused = system.apply(bad, check=False)
    assert refused.returncode != 0
    assert "spec.memory.size" in refused.stderr

    system.apply(
        vm_manifest("no-image", namespace, nodeName="node-a", kernel={"image": "missing-kernel"})
    )

    def stalled(name: str) -> dict[str, Any] | None:
        obj = vm(system, namespace, name)
        cond = condition(obj, "Stalled")
        return obj if cond and cond["status"] == "True" else None

    obj = wait_for(lambda: stalled("no-image"), 30, what="Stalled")
    cond = condition(obj, "Stalled")
    assert cond is not None
    assert cond["reason"] == "ImageNotFound"
    assert "missing-kernel" in cond["message"]
    assert domain_name(namespace, "no-image") not in domains(node_a)

    system.apply(vm_manifest("huge", namespace, memory={"size": "1Ti"}))
    obj = wait_for(lambda: stalled("huge"), 30, what="Stalled (capacity)")
    assert condition(obj, "Stalled")["reason"] == "InsufficientCapacity"  # type: ignore[index]


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.2])
def test_agent_killed_during_create_and_delete(
    system: Cluster, namespace: str, node_a: hn.Node, delay: float
) -> None:
    name = "crashy"
    disks = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]
    system.apply(vm_manifest(name, namespace, nodeName="node-a", disks=disks))
    time.sleep(delay)
    operators.kill(system.state_dir, "agent-node-a", signal.SIGKILL)
    operators.start_agent(system.state_dir, system.env, node_a)
    obj = wait_status(system, namespace, name, "Running")
    uid = obj["metadata"]["uid"]
    dom = domain_name(namespace, name)
    assert list(domains(node_a)).count(dom) == 1
    assert len(volumes(node_a, uid)) == 1

    system.kubectl("delete", "vm", name, "-n", namespace, "--wait=false")
    time.sleep(delay / 2)
    operators.kill(system.state_dir, "agent-node-a", signal.SIGKILL)
    operators.start_agent(system.state_dir, system.env, node_a)
    system.kubectl(
        "wait", "--for=delete", f"vm/{name}", "-n", namespace, "--timeout=90s", check=False
    )
    wait_for(lambda: dom not in domains(node_a), 60, what="the domain to go")
    assert volumes(node_a, uid) == []


def test_libvirtd_restart_keeps_guests_running(
    system: Cluster, namespace: str, node_a: hn.Node
) -> None:
    system.apply(vm_manifest("steady", namespace, nodeName="node-a"))
    wait_status(system, namespace, "steady", "Running")
    dom = domain_name(namespace, "steady")
    hn.wait_for_serial(node_a, dom, BOOT_MARKER, timeout=60)

    hn.restart_libvirtd(node_a)
    time.sleep(3)  # the agent notices, reconnects with backoff and resyncs
    assert domains(node_a)[dom] == "running"
    assert hn.serial_log(node_a, dom).count(BOOT_MARKER) == 1  # the guest was not restarted
    assert vm(system, namespace, "steady")["status"]["printableStatus"] == "Running"

    # Lifecycle events flow again after the reconnect: a destroy is healed.
    virsh(node_a, "destroy", dom)
    wait_for(lambda: domains(node_a).get(dom) == "running", 60, what="healed after reconnect")


def test_cloud_init_seed_is_attached(
    system: Cluster, namespace: str, node_a: hn.Node, tmp_path: Any
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "seed", "namespace": namespace},
        "stringData": {"userdata": "#cloud-config\nhostname: from-secret\n"},
    }
    system.apply(secret)
    cloud_init = {"userDataSecretRef": {"name": "seed"}, "networkData": "version: 2\n"}
    system.apply(vm_manifest("seeded", namespace, nodeName="node-a", cloudInit=cloud_init))
    obj = wait_status(system, namespace, "seeded", "Running")
    uid = obj["metadata"]["uid"]
    xml = virsh(node_a, "dumpxml", domain_name(namespace, "seeded"))
    (seed,) = [
        d for d in ElementTree.fromstring(xml).iterfind("devices/disk")
        if (d.find("source") is not None and d.find("source").get("file", "")  # type: ignore[union-attr]
            .endswith(f"{uid}-cidata.iso"))
    ]  # fmt: skip
    # A read-only virtio disk: cloud kernels have no AHCI for a SATA cdrom.
    assert seed.get("device") == "disk"
    assert seed.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    assert seed.find("readonly") is not None
    iso = tmp_path / "seed.iso"
    virsh(node_a, "vol-download", "--pool", hn.LOCAL_POOL, f"{uid}-cidata.iso", str(iso))
    data = iso.read_bytes()
    assert data[0x8001:0x8006] == b"CD001"
    assert b"hostname: from-secret" in data
    assert uid.encode() in data  # meta-data instance-id


def test_iotune_change_is_applied_live(system: Cluster, namespace: str, node_a: hn.Node) -> None:
    disk = {"name": "data", "size": "16Mi", "source": {"blank": {}}}
    system.apply(vm_manifest("tuned", namespace, nodeName="node-a", disks=[disk]))
    wait_status(system, namespace, "tuned", "Running")
    dom = domain_name(namespace, "tuned")
    hn.wait_for_serial(node_a, dom, BOOT_MARKER, timeout=60)

    limited = {**disk, "iotune": {"totalIopsSec": 321}}
    system.apply(vm_manifest("tuned", namespace, nodeName="node-a", disks=[limited]))
    wait_for(
        lambda: "total_iops_sec : 321" in virsh(node_a, "blkdeviotune", dom, "vda"),
        30,
        what="the iotune limit on the running domain",
    )
    obj = vm(system, namespace, "tuned")
    assert condition(obj, "RestartRequired") is None
    assert hn.serial_log(node_a, dom).count(BOOT_MARKER) == 1
    assert "321" in virsh(node_a, "dumpxml", "--inactive", dom)  # and for the next boot


def test_crash_loop_backs_off(system: Cluster, namespace: str, node_a: hn.Node) -> None:
    cmdline = guest_cmdline(poweroff_after=1)
    system.apply(vm_manifest("loop", namespace, nodeName="node-a", cmdline=cmdline))
    obj = wait_status(system, namespace, "loop", "CrashLoopBackOff", timeout=120)
    assert obj["status"]["restartCount"] >= 1
    assert obj["status"]["crashLoopRetryTime"]
    assert condition(obj, "Ready")["reason"] == "CrashLoopBackOff"  # type: ignore[index]
    assert "CrashLoopBackOff" in events(system, namespace, "loop")
    # Halting it ends the loop: stopped on purpose is healthy.
    system.kubectl(
        "patch",
        "vm",
        "loop",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"runStrategy":"Halted"}}',
    )
    wait_status(system, namespace, "loop", "Stopped")


def request_power(system: Cluster, namespace: str, name: str, action: str) -> str:
    """``virtfleet <action> VM``, as a person runs it; returns the request id."""
    subprocess.run(
        [sys.executable, "-m", "virtfleet.cli", action, name, "-n", namespace],
        env={**os.environ, "KUBECONFIG": system.env["KUBECONFIG"]},
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    value = vm(system, namespace, name)["metadata"]["annotations"]["virtfleet.io/power-request"]
    assert value.startswith(f"{action}/")
    return str(value.split("/", 1)[1])


def test_power_requests_never_touch_spec(system: Cluster, namespace: str, node_a: hn.Node) -> None:
    system.apply(vm_manifest("manual", namespace, nodeName="node-a", runStrategy="Manual"))
    wait_status(system, namespace, "manual", "Stopped")  # Manual: nothing starts it
    dom = domain_name(namespace, "manual")

    request_power(system, namespace, "manual", "start")
    wait_status(system, namespace, "manual", "Running")
    hn.wait_for_serial(node_a, dom, BOOT_MARKER, timeout=60)

    request_power(system, namespace, "manual", "pause")
    wait_status(system, namespace, "manual", "Paused")
    assert domains(node_a)[dom] == "paused"
    request_power(system, namespace, "manual", "unpause")
    wait_status(system, namespace, "manual", "Running")

    last = request_power(system, namespace, "manual", "stop")
    wait_status(system, namespace, "manual", "Stopped")
    obj = vm(system, namespace, "manual")
    assert obj["status"]["lastPowerRequest"] == last
    assert obj["metadata"]["generation"] == 1
    assert obj["spec"]["runStrategy"] == "Manual"
