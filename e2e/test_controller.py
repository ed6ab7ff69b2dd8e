"""The controller against the real apiserver: placement, spread, pins, refusals, heartbeats.

The controller runs as a subprocess (``virtfleet controller --standalone``), serving only
this module's namespaces. Its fleet is two *fake* nodes made for this module — Node
objects plus VMHosts whose status this test writes as an agent would (Ready, memory, a
heartbeat kept fresh by a thread). Test VMs select the fake nodes by a label, so real
agents on node-a/node-b are never disturbed and never disturb the assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness import operators
from harness.testing import Cluster, wait_for

REPO = Path(__file__).resolve().parents[1]
VIRTFLEET = REPO / ".venv" / "bin" / "virtfleet"
RUN = uuid.uuid4().hex[:5]
POOL_LABEL = "virtfleet.io/e2e-pool"
HOST_MEMORY = 64 * 2**30
NODE_LABEL = "virtfleet.io/node"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeFleet:
    """Fake nodes and the 'agent' that keeps their VMHost heartbeats fresh."""

    cluster: Cluster
    pool: str
    nodes: list[str]
    fresh: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def write_host(self, name: str, heartbeat: datetime) -> None:
        status = {
            "status": {
                "memoryBytes": HOST_MEMORY,
                "freeMemoryBytes": HOST_MEMORY,
                "cpus": 8,
                "heartbeatTime": rfc3339(heartbeat),
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "AgentReady",
                        "message": "fake agent of the controller e2e test",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            }
        }
        self.cluster.kubectl(
            "patch", "vmhost", name, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip

    def beat(self) -> None:
        while not self.stop.wait(3):
            for name in list(self.fresh):
                self.write_host(name, datetime.now(UTC))

    def go_silent(self, name: str, ago: timedelta) -> None:
        self.fresh.discard(name)
        self.write_host(name, datetime.now(UTC) - ago)


@pytest.fixture(scope="module")
def fleet(cluster: Cluster) -> Iterator[FakeFleet]:
    pool = f"ctl-{RUN}"
    nodes = [f"e2e-{RUN}-a", f"e2e-{RUN}-b"]
    for name in nodes:
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, POOL_LABEL: pool},
                },
            }
        )
        cluster.apply(
            {"apiVersion": "virtfleet.io/v1alpha1", "kind": "VMHost", "metadata": {"name": name}}
        )
    fake = FakeFleet(cluster, pool, nodes, fresh=set(nodes))
    for name in nodes:
        fake.write_host(name, datetime.now(UTC))
    thread = threading.Thread(target=fake.beat, daemon=True)
    thread.start()
    yield fake
    fake.stop.set()
    thread.join(10)
    for name in nodes:
        cluster.kubectl("delete", "vmhost", name, "--wait=false", check=False)
        cluster.kubectl("delete", "node", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def controller(
    cluster: Cluster, fleet: FakeFleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    # The suite's own controller (started by earlier tests' `system` fixture) serves every
    # namespace: two deciders would race on these VMs. It rests while this module runs.
    suite_controller = operators.pid_of(cluster.state_dir, "controller") is not None
    operators.kill(cluster.state_dir, "controller", signal.SIGTERM)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(VIRTFLEET), "controller", "--standalone",
                "--namespace", f"vfctl-{RUN}-*",
                "--heartbeat-timeout", "40", "--heartbeat-check-interval", "1",
                "--retry-interval", "5", "--log-format", "json",
            ],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "KUBECONFIG": cluster.env["KUBECONFIG"]},
        )  # fmt: skip
    try:
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if suite_controller:
            operators.start_controller(cluster.state_dir, cluster.env)
        print(log.read_text()[-6000:])  # shown by pytest when a test failed


@pytest.fixture
def ns(cluster: Cluster, controller: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace the test controller serves (its --namespace pattern), deleted after."""
    name = f"vfctl-{RUN}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "vm", "--all", "-n", name, "--wait=false", check=False)
    # The fake nodes have no agent to release its finalizer: play that agent.
    for vm_ref in cluster.kubectl(
        "get", "vm", "-n", name, "-o", "name", check=False
    ).stdout.split():
        cluster.kubectl(
            "patch", vm_ref, "-n", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
            check=False,
        )  # fmt: skip
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def vm(name: str, memory: str = "1Gi", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"memory": {"size": memory}, **spec},
    }


def pooled(fleet: FakeFleet, name: str, memory: str = "1Gi", **spec: Any) -> dict[str, Any]:
    return vm(name, memory, nodeSelector={POOL_LABEL: fleet.pool}, **spec)


def get_vm(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return cluster.get("vm", name, ns)


def condition(obj: dict[str, Any], type: str) -> dict[str, Any] | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type), None)


def wait_placed(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    def placed() -> dict[str, Any] | None:
        obj = get_vm(cluster, ns, name)
        node = (obj.get("status") or {}).get("nodeName")
        labels = obj["metadata"].get("labels") or {}
        return obj if node and labels.get(NODE_LABEL) == node else None

    result: dict[str, Any] = wait_for(placed, timeout=30, what=f"{ns}/{name} placed and labelled")
    return result


def wait_reason(cluster: Cluster, ns: str, name: str, reason: str) -> dict[str, Any]:
    def refused() -> dict[str, Any] | None:
        obj = get_vm(cluster, ns, name)
        ready = condition(obj, "Ready")
        return obj if ready and ready["reason"] == reason else None

    result: dict[str, Any] = wait_for(
        refused, timeout=30, what=f"{ns}/{name} Ready reason {reason}"
    )
    return result


def test_a_vm_gets_a_node_and_the_label(cluster: Cluster, fleet: FakeFleet, ns: str) -> None:
    cluster.apply(pooled(fleet, "first"), "-n", ns)
    obj = wait_placed(cluster, ns, "first")
    status = obj["status"]
    assert status["nodeName"] in fleet.nodes
    assert status["printableStatus"] == "Starting"
    ready = condition(obj, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForAgent")
    assert ready["observedGeneration"] == 1
    assert obj["metadata"]["generation"] == 1  # spec never written
    # The node agent's finalizer came with the label (one write); kopf wrote no annotations
    assert obj["metadata"]["finalizers"] == [f"virtfleet.io/agent-{status['nodeName']}"]
    assert not obj["metadata"].get("annotations", {}).keys() - {
        "kubectl.kubernetes.io/last-applied-configuration"
    }
    events = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=first",
        "-o", "json",
    )  # fmt: skip
    reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
    assert "Scheduled" in reasons
    table = cluster.kubectl("get", "vm", "-n", ns).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "STATUS", "NODE", "READY"]
    assert row.split()[:4] == ["first", "Starting", status["nodeName"], "False"]


def test_two_vms_spread_across_nodes(cluster: Cluster, fleet: FakeFleet, ns: str) -> None:
    # Big enough that leftovers of other tests (1Gi each) cannot outweigh the spread.
    cluster.apply(pooled(fleet, "left", "16Gi"), "-n", ns)
    cluster.apply(pooled(fleet, "right", "16Gi"), "-n", ns)
    nodes = {wait_placed(cluster, ns, n)["status"]["nodeName"] for n in ("left", "right")}
    assert nodes == set(fleet.nodes)


def test_a_pinned_vm_lands_on_its_node(cluster: Cluster, fleet: FakeFleet, ns: str) -> None:
    for node in fleet.nodes:
        cluster.apply(vm(f"pin-{node[-1]}", nodeName=node), "-n", ns)
    for node in fleet.nodes:
        assert wait_placed(cluster, ns, f"pin-{node[-1]}")["status"]["nodeName"] == node


def test_too_big_a_vm_is_stalled_with_a_readable_message(
    cluster: Cluster, fleet: FakeFleet, ns: str
) -> None:
    cluster.apply(pooled(fleet, "huge", "1Ti"), "-n", ns)
    obj = wait_reason(cluster, ns, "huge", "InsufficientCapacity")
    assert obj["status"]["printableStatus"] == "Scheduling"
    assert "nodeName" not in obj["status"]
    stalled = condition(obj, "Stalled")
    assert stalled is not None
    assert (stalled["status"], stalled["reason"]) == ("True", "InsufficientCapacity")
    for node in fleet.nodes:
        assert f"{node}: 64Gi total < 1Ti requested" in stalled["message"]
    assert condition(obj, "Reconciling") is None
    assert NODE_LABEL not in (obj["metadata"].get("labels") or {})
    # kubectl wait sees the kstatus conditions
    cluster.kubectl("wait", "vm/huge", "-n", ns, "--for=condition=Stalled", "--timeout=5s")


def test_a_selector_nobody_matches_waits_with_the_reason(
    cluster: Cluster, fleet: FakeFleet, ns: str
) -> None:
    cluster.apply(vm("picky", nodeSelector={POOL_LABEL: "nobody-has-this"}), "-n", ns)
    obj = wait_reason(cluster, ns, "picky", "Unschedulable")
    assert obj["status"]["printableStatus"] == "Scheduling"
    reconciling = condition(obj, "Reconciling")
    assert reconciling is not None
    assert reconciling["status"] == "True"
    assert f"does not match nodeSelector {POOL_LABEL}=nobody-has-this" in reconciling["message"]
    assert condition(obj, "Stalled") is None
    # an Event says why, once (not once per retry)
    time.sleep(6)  # > --retry-interval
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=picky", "-o", "json"
    ).stdout
    events = json.loads(out)["items"]
    unschedulable = [e for e in events if e["reason"] == "Unschedulable"]
    assert len(unschedulable) == 1
    assert unschedulable[0]["count"] == 1
    assert get_vm(cluster, ns, "picky")["metadata"]["generation"] == 1


def test_a_lost_label_is_repaired(cluster: Cluster, fleet: FakeFleet, ns: str) -> None:
    cluster.apply(pooled(fleet, "relabel"), "-n", ns)
    node = wait_placed(cluster, ns, "relabel")["status"]["nodeName"]
    cluster.kubectl("label", "vm", "relabel", "-n", ns, f"{NODE_LABEL}=somewhere-else",
                    "--overwrite")  # fmt: skip
    obj = wait_placed(cluster, ns, "relabel")
    assert obj["metadata"]["labels"][NODE_LABEL] == node


def test_vms_of_a_silent_host_become_unknown(cluster: Cluster, fleet: FakeFleet, ns: str) -> None:
    silent = fleet.nodes[0]
    cluster.apply(vm("orphan", nodeName=silent), "-n", ns)
    wait_placed(cluster, ns, "orphan")
    fleet.go_silent(silent, ago=timedelta(minutes=10))
    try:

        def unknown() -> dict[str, Any] | None:
            obj = get_vm(cluster, ns, "orphan")
            return obj if obj["status"].get("printableStatus") == "Unknown" else None

        obj = wait_for(unknown, timeout=20, what="VM of a silent host marked Unknown")
        ready = condition(obj, "Ready")
        assert ready is not None
        assert (ready["status"], ready["reason"]) == ("Unknown", "NodeUnreachable")
        assert silent in ready["message"]
        assert obj["metadata"]["generation"] == 1
        table = cluster.kubectl("get", "vm", "orphan", "-n", ns, "--no-headers").stdout
        assert table.split()[1:3] == ["Unknown", silent]
    finally:
        fleet.fresh.add(silent)
        fleet.write_host(silent, datetime.now(UTC))
