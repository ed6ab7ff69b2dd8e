"""``helm install virtfleet charts/virtfleet`` on kubelet nodes: the chart's pods, for real.

A system of its own (``e2e/up --kubelet``, other ports than the suite's shared system):
every node runs containerd + kubelet in a network namespace of its own, the image is
built from the Dockerfile (``scripts/build-image``) and imported into each node. The
release's agent DaemonSet and controller Deployment must come up as Running pods under
the Pod Security levels the chart asks for, and a VM must boot through them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from harness import cluster as system
from harness import helm as hh
from harness import nodes as hn
from harness.guest import BOOT_MARKER
from harness.testing import Cluster, condition, domain_name, vm_manifest, wait_for

REPO = Path(__file__).resolve().parents[1]

#: Ports of its own, so it runs beside the suite's shared system; all below the ephemeral
#: range (32768-60999 here), where an outgoing connection may hold any port for a while
#: (a first run failed on 53800 "in use").
OWN_PORTS = {
    "VIRTFLEET_ETCD_CLIENT_PORT": "27790",
    "VIRTFLEET_ETCD_PEER_PORT": "27800",
    "VIRTFLEET_APISERVER_PORT": "26443",
    "VIRTFLEET_CONTROLLER_MANAGER_PORT": "26257",
    "VIRTFLEET_NODE_PORT_BASE": "27610",
    "VIRTFLEET_OBJECTSTORE_PORT": "27300",
    "VIRTFLEET_PROMETHEUS_PORT": "27090",
    "VIRTFLEET_CONTROLLER_METRICS_PORT": "27453",
    "VIRTFLEET_MIGRATION_PORT_BASE": "28000",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("kubelet") / "system"
    env = {**os.environ, **OWN_PORTS}
    started = time.monotonic()
    try:
        up = subprocess.run(
            [str(REPO / "e2e" / "up"), "--state-dir", str(state_dir), "--helm"],
            capture_output=True, text=True, env=env, timeout=1800, check=False,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr[-3000:]
        cluster_env = system.read_env(state_dir)
        cluster = Cluster(
            state_dir=state_dir, env=cluster_env, nodes=hn.nodes_from_env(cluster_env)
        )
        said = next(line for line in up.stderr.splitlines() if line.startswith("virtfleet: up in"))
        print(f"\n[timing] e2e/up --helm (kubelet nodes + helm install): {said}")
        print(f"[timing] the fixture: {time.monotonic() - started:.0f}s")
        yield cluster
    finally:
        subprocess.run(
            [str(REPO / "e2e" / "down"), "--state-dir", str(state_dir), "--wipe"],
            env=env, timeout=300, check=False,
        )  # fmt: skip


def pods(cluster: Cluster) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        cluster.kubectl("get", "pods", "-A", "-o", "json").stdout
    )["items"]
    return items


def test_the_release_runs_as_pods_under_pod_security(installed: Cluster) -> None:
    running = {
        (p["metadata"]["namespace"], p["spec"].get("nodeName")): p
        for p in pods(installed)
        if p["status"].get("phase") == "Running"
        and all(c.get("ready") for c in p["status"].get("containerStatuses", []))
    }
    assert ("virtfleet-agent", "node-a") in running
    assert ("virtfleet-agent", "node-b") in running
    assert any(ns == "virtfleet-system" for ns, _ in running)
    controller = next(p for (ns, _), p in running.items() if ns == "virtfleet-system")
    # The controller is in the pods' network (not the node's), as non-root.
    assert not controller["spec"].get("hostNetwork")
    assert controller["status"]["podIP"].startswith("10.244.0.")
    for namespace, level in (("virtfleet-agent", "privileged"), ("virtfleet-system", "restricted")):
        labels = installed.get("namespace", namespace)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == level
    # Enforced by the apiserver: a privileged pod is refused in the controller's namespace.
    intruder = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "intruder", "namespace": "virtfleet-system"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "localhost/virtfleet:dev",
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    refused = installed.apply(intruder, check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted' in refused.stderr
    # Each agent pod reaches its own node's libvirtd through the hostPath socket.
    for name in ("node-a", "node-b"):
        wait_for(partial(host_ready, installed, name), timeout=60, what=f"vmhost/{name} Ready")


def host_ready(cluster: Cluster, name: str) -> bool:
    found = cluster.kubectl("get", "vmhost", name, "-o", "json", check=False)
    if found.returncode != 0:
        return False
    return (condition(json.loads(found.stdout), "Ready") or {}).get("status") == "True"


def test_a_vm_boots_through_the_installed_release(installed: Cluster) -> None:
    installed.kubectl("create", "namespace", "apps")
    installed.apply(vm_manifest("web", "apps", nodeName="node-b"))
    wait_for(
        lambda: (
            (condition(installed.get("vm", "web", "apps"), "Ready") or {}).get("status") == "True"
        ),
        timeout=120,
        what="vm/web Ready",
    )
    vm = installed.get("vm", "web", "apps")
    assert vm["status"]["printableStatus"] == "Running"
    node_b = installed.node("node-b")
    hn.wait_for_serial(node_b, domain_name("apps", "web"), BOOT_MARKER, timeout=120)
    installed.kubectl("delete", "vm", "web", "-n", "apps", "--timeout=120s")
    listed = subprocess.run(
        ["virsh", "-q", "-c", node_b.uri, "list", "--all", "--name"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert domain_name("apps", "web") not in listed.stdout.split()


UPTIME = re.compile(r"^VF-UPTIME (\d+(?:\.\d+)?)\s*$", re.MULTILINE)


def uptimes(node: hn.Node, dom: str) -> list[float]:
    try:
        return [float(m.group(1)) for m in UPTIME.finditer(hn.serial_log(node, dom))]
    except FileNotFoundError:
        return []


def in_phase(
    cluster: Cluster, kind: str, name: str, namespace: str, phases: tuple[str, ...]
) -> dict[str, Any] | None:
    """The object once its phase (a VM's printableStatus) is one of ``phases``."""
    obj = cluster.get(kind, name, namespace)
    status = obj.get("status") or {}
    return obj if (status.get("phase") or status.get("printableStatus")) in phases else None


def running_guest(cluster: Cluster, namespace: str, name: str) -> tuple[hn.Node, str]:
    """A new VM in a new namespace, Running, its guest up for 3 s: (its node, domain)."""
    cluster.kubectl("create", "namespace", namespace)
    cluster.apply(vm_manifest(name, namespace))
    vm = wait_for(
        partial(in_phase, cluster, "vm", name, namespace, ("Running",)),
        timeout=120,
        what=f"vm/{name} Running",
    )
    node = cluster.node(vm["status"]["nodeName"])
    dom = domain_name(namespace, name)
    wait_for(lambda: max(uptimes(node, dom), default=0) >= 3, timeout=90, what="uptime 3 s")
    return node, dom


def create_and_wait(
    cluster: Cluster, kind: str, name: str, namespace: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """Create a one-shot object (VMSnapshot, VMRestore, VMMigration); return it once its
    phase is final."""
    final = {"VMSnapshot": ("Ready", "Failed"), "VMRestore": ("Succeeded", "Failed"),
             "VMMigration": ("Succeeded", "Failed")}[kind]  # fmt: skip
    meta = {"name": name, "namespace": namespace}
    cluster.apply(
        {"apiVersion": "virtfleet.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}
    )
    found: dict[str, Any] = wait_for(
        partial(in_phase, cluster, kind.lower(), name, namespace, final),
        timeout=180,
        what=f"{kind.lower()}/{name} finished",
    )
    return found


def test_a_live_migration_through_the_installed_release(installed: Cluster) -> None:
    """The agent pods publish each node's migration URI; the guest keeps its uptime."""
    source, dom = running_guest(installed, "moves", "mover")
    target = next(n for n in installed.nodes if n.name != source.name)
    assert installed.get("vmhost", target.name)["status"]["migrationURI"] == target.uri
    spec = {"vmName": "mover", "targetNode": target.name}
    done = create_and_wait(installed, "VMMigration", "move-1", "moves", spec)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    last_on_source = max(uptimes(source, dom))
    wait_for(
        lambda: max(uptimes(target, dom), default=0) >= last_on_source + 2,
        timeout=60,
        what="uptime counting on the target",
    )
    assert min(u for u in uptimes(target, dom)) >= last_on_source - 1  # never rebooted
    assert installed.get("vm", "mover", "moves")["status"]["nodeName"] == target.name


def test_a_memory_snapshot_and_restore_through_the_installed_release(installed: Cluster) -> None:
    """The agent pod snapshots the guest's memory; restoring it sends the uptime back."""
    installed.kubectl("create", "namespace", "snaps")
    disks = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]  # holds the memory
    installed.apply(vm_manifest("warm", "snaps", disks=disks))
    vm = wait_for(
        partial(in_phase, installed, "vm", "warm", "snaps", ("Running",)), 120, what="vm Running"
    )
    node, dom = installed.node(vm["status"]["nodeName"]), domain_name("snaps", "warm")
    wait_for(lambda: max(uptimes(node, dom), default=0) >= 5, timeout=90, what="uptime 5 s")
    snapshot_taken_at = max(uptimes(node, dom))
    snap = create_and_wait(installed, "VMSnapshot", "warm-1", "snaps", {"vmName": "warm"})
    assert snap["status"]["phase"] == "Ready", snap["status"]
    assert snap["status"]["memoryIncluded"] is True
    wait_for(
        lambda: max(uptimes(node, dom)) >= snapshot_taken_at + 10, timeout=60, what="10 s more"
    )
    peak = max(uptimes(node, dom))
    spec = {"vmName": "warm", "snapshotName": "warm-1"}
    restore = create_and_wait(installed, "VMRestore", "back", "snaps", spec)
    assert restore["status"]["phase"] == "Succeeded", restore["status"]
    assert restore["status"]["memoryRestored"] is True
    # The guest's clock went back to about the snapshot's moment, without a reboot.
    wait_for(
        lambda: any(u < peak - 5 for u in uptimes(node, dom)[-3:]), timeout=30, what="jump back"
    )
    assert hn.serial_log(node, dom).count(BOOT_MARKER) == 1


def test_helm_upgrade_rolls_the_agents_and_no_guest_restarts(installed: Cluster) -> None:
    node, dom = running_guest(installed, "steady", "steady")
    before = agent_pods(installed)
    helm_env = {**os.environ, "KUBECONFIG": installed.env["KUBECONFIG"]}
    hh.helm(
        "upgrade", "virtfleet", *hh.chart_args(installed.nodes),
        "--set", "agent.logLevel=INFO", "--wait", "--timeout", "300s", env=helm_env,
    )  # fmt: skip
    wait_for(
        lambda: len(after := agent_pods(installed)) == 2 and not set(after) & set(before),
        timeout=180,
        what="every agent pod replaced",
    )
    uptime_then = max(uptimes(node, dom))
    wait_for(
        lambda: max(uptimes(node, dom), default=0) >= uptime_then + 3,
        timeout=60,
        what="the guest's uptime still counting",
    )
    assert hn.serial_log(node, dom).count(BOOT_MARKER) == 1  # booted once, never again
    wait_for(
        lambda: (
            (condition(installed.get("vm", "steady", "steady"), "Ready") or {}).get("status")
            == "True"
        ),
        timeout=60,
        what="vm/steady Ready under the new agents",
    )


def agent_pods(cluster: Cluster) -> list[str]:
    return [
        p["metadata"]["uid"]
        for p in pods(cluster)
        if p["metadata"]["namespace"] == "virtfleet-agent"
        and p["status"].get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    ]


def test_helm_uninstall_leaves_the_vms_and_their_guests_running(installed: Cluster) -> None:
    """docs/install.md: uninstalling removes virtfleet, never the guests it runs."""
    running = [
        (vm["metadata"]["namespace"], vm["metadata"]["name"], vm["status"]["nodeName"])
        for vm in json.loads(installed.kubectl("get", "vm", "-A", "-o", "json").stdout)["items"]
        if (vm.get("status") or {}).get("printableStatus") == "Running"
    ]
    assert running, "the earlier tests leave running VMs"
    helm_env = {**os.environ, "KUBECONFIG": installed.env["KUBECONFIG"]}
    hh.helm("uninstall", "virtfleet", "--wait", "--timeout", "300s", env=helm_env)
    wait_for(lambda: not agent_pods(installed), timeout=120, what="agent pods gone")
    for namespace, name, node_name in running:
        node = installed.node(node_name)
        dom = domain_name(namespace, name)
        state = subprocess.run(
            ["virsh", "-q", "-c", node.uri, "domstate", dom],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        assert state == "running", f"{dom} on {node_name}: {state}"
        assert installed.get("vm", name, namespace)["metadata"]["name"] == name  # kept
