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
CHART = REPO / "charts" / "virtfleet"
VALUES = REPO / "e2e" / "kubelet" / "values.yaml"

#: Ports of its own (test_system.py uses 3xxxx), so it runs beside the shared system.
OWN_PORTS = {
    "VIRTFLEET_ETCD_CLIENT_PORT": "53790",
    "VIRTFLEET_ETCD_PEER_PORT": "53800",
    "VIRTFLEET_APISERVER_PORT": "46443",
    "VIRTFLEET_CONTROLLER_MANAGER_PORT": "46257",
    "VIRTFLEET_NODE_PORT_BASE": "46610",
    "VIRTFLEET_MIGRATION_PORT_BASE": "47000",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("kubelet") / "system"
    env = {**os.environ, **OWN_PORTS}
    started = time.monotonic()
    up = subprocess.run(
        [str(REPO / "e2e" / "up"), "--state-dir", str(state_dir), "--kubelet"],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        cluster_env = system.read_env(state_dir)
        cluster = Cluster(
            state_dir=state_dir, env=cluster_env, nodes=hn.nodes_from_env(cluster_env)
        )
        helm_env = {**os.environ, "KUBECONFIG": cluster_env["KUBECONFIG"]}
        hh.helm(
            "install", "virtfleet", str(CHART), "-f", str(VALUES),
            "--wait", "--timeout", "300s", env=helm_env,
        )  # fmt: skip
        print(f"\n[timing] e2e/up --kubelet + helm install: {time.monotonic() - started:.0f}s")
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
