"""The e2e control plane is a real Kubernetes, not a stand-in.

Each test proves one piece of machinery the operator depends on: the apiserver's
readiness, the namespace and garbage-collector controllers of kube-controller-manager,
ServiceAccount tokens and RBAC, and a clean ``down``/``up`` lifecycle.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import controlplane

pytestmark = pytest.mark.e2e

CONTROLLER_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Cluster:
    state_dir: Path
    kubeconfig: Path
    server: str


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = CONTROLLER_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def gone(kubeconfig: Path, *resource: str) -> Callable[[], bool]:
    def check() -> bool:
        result = kubectl(kubeconfig, "get", *resource, check=False)
        return result.returncode != 0 and "NotFound" in result.stderr

    return check


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


SELF_TEST_PORTS = {
    "VIRTFLEET_ETCD_CLIENT_PORT": 33790,
    "VIRTFLEET_ETCD_PEER_PORT": 33800,
    "VIRTFLEET_APISERVER_PORT": 26443,
    "VIRTFLEET_CONTROLLER_MANAGER_PORT": 26257,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("controlplane")
    # Ports of its own, so this self-test can run beside the suite's shared system.
    with pytest.MonkeyPatch.context() as patch:
        for var, port in SELF_TEST_PORTS.items():
            patch.setenv(var, str(port))
        env = controlplane.up(state_dir)
        try:
            yield Cluster(state_dir, Path(env["KUBECONFIG"]), env["KUBE_APISERVER"])
        finally:
            controlplane.down(state_dir, wipe=True)


@pytest.fixture
def namespace(cluster: Cluster) -> str:
    name = unique("e2e")
    kubectl(cluster.kubeconfig, "create", "namespace", name)
    return name


def test_apiserver_is_ready_and_is_the_pinned_kubernetes(cluster: Cluster) -> None:
    assert kubectl(cluster.kubeconfig, "get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(kubectl(cluster.kubeconfig, "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.32.")


def test_namespace_controller_finalizes_deleted_namespace(cluster: Cluster) -> None:
    name = unique("doomed")
    kubectl(cluster.kubeconfig, "create", "namespace", name)
    kubectl(cluster.kubeconfig, "create", "configmap", "content", "-n", name)
    kubectl(cluster.kubeconfig, "delete", "namespace", name, "--wait=false")
    wait_until(gone(cluster.kubeconfig, "namespace", name), f"namespace {name} to disappear")


def test_serviceaccount_token_is_authorized_by_rbac_only(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    admin = cluster.kubeconfig
    kubectl(admin, "create", "serviceaccount", "robot", "-n", namespace)
    token = controlplane.mint_token(admin, namespace, "robot", duration="10m")
    robot = controlplane.kubeconfig_for_token(
        tmp_path / "robot.kubeconfig",
        cluster.server,
        controlplane.ca_file(cluster.state_dir),
        token,
    )
    whoami = json.loads(kubectl(robot, "auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:robot"

    def allowed(*scope: str) -> bool:
        result = kubectl(robot, "get", "pods", *scope, check=False)
        assert result.returncode == 0 or "Forbidden" in result.stderr, result.stderr
        return result.returncode == 0

    assert not allowed("-A")
    assert not allowed("-n", namespace)

    kubectl(admin, "create", "rolebinding", "robot-view", "--clusterrole=view",
            f"--serviceaccount={namespace}:robot", "-n", namespace)  # fmt: skip
    wait_until(lambda: allowed("-n", namespace), "the RoleBinding to take effect", timeout=15)
    assert not allowed("-A"), "a RoleBinding must not grant cluster-wide access"

    binding = unique("robot-view")
    kubectl(admin, "create", "clusterrolebinding", binding, "--clusterrole=view",
            f"--serviceaccount={namespace}:robot")  # fmt: skip
    try:
        wait_until(lambda: allowed("-A"), "the ClusterRoleBinding to take effect", timeout=15)
    finally:
        kubectl(admin, "delete", "clusterrolebinding", binding)


def test_garbage_collector_removes_dependents_of_deleted_owner(
    cluster: Cluster, namespace: str
) -> None:
    admin = cluster.kubeconfig
    kubectl(admin, "create", "configmap", "owner", "-n", namespace)
    uid = kubectl(admin, "get", "configmap", "owner", "-n", namespace,
                  "-o", "jsonpath={.metadata.uid}").stdout  # fmt: skip
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ],
        },
    }
    kubectl(admin, "create", "-f", "-", stdin=json.dumps(dependent))
    kubectl(admin, "delete", "configmap", "owner", "-n", namespace)
    wait_until(
        gone(admin, "configmap", "dependent", "-n", namespace),
        "the garbage collector to delete the dependent ConfigMap",
    )


def test_down_leaves_no_process_and_up_restarts_with_data(cluster: Cluster) -> None:
    before = controlplane.pids(cluster.state_dir)
    assert set(before) == {"etcd", "kube-apiserver", "kube-controller-manager"}
    assert controlplane.up(cluster.state_dir)["KUBECONFIG"] == str(cluster.kubeconfig)
    assert controlplane.pids(cluster.state_dir) == before, "up must be idempotent"
    survivor = unique("survivor")
    kubectl(cluster.kubeconfig, "create", "namespace", survivor)

    controlplane.down(cluster.state_dir)
    controlplane.down(cluster.state_dir)  # idempotent

    assert controlplane.pids(cluster.state_dir) == {}
    for name, pid in before.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) is still alive"
    assert not list((cluster.state_dir / "controlplane" / "pids").glob("*.pid"))

    started = time.monotonic()
    controlplane.up(cluster.state_dir)
    print(f"warm up() took {time.monotonic() - started:.1f}s")
    assert kubectl(cluster.kubeconfig, "get", "--raw", "/readyz").stdout.strip() == "ok"
    kubectl(cluster.kubeconfig, "get", "namespace", survivor)  # etcd data survived down
