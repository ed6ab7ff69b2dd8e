"""The controller's failover with a fake API: fence the silent node (compare-and-swap on
its Lease), then move its HA VM (status first, then label and finalizer swap)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from tests.controller.fleet_builders import GI, NOW, vm_body

from testkit.kube import FakeKube
from virtfleet.controller.controller import Controller
from virtfleet.controller.settings import ControllerSettings
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.node_fencing import (
    FENCED_ANNOTATION,
    SELF_FENCE_ANNOTATION,
    WATCHDOG_ANNOTATION,
)
from virtfleet.runtime.kube import ApiUnavailable

SHARED = "virtfleet-shared"


def host_body(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "memoryBytes": 8 * GI,
            "heartbeatTime": "2026-01-01T11:59:55Z",
            "pools": [{"name": SHARED, "shared": True}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady"}],
        },
    }


def lease_body(node: str, renew: str = "2026-01-01T11:59:40.000000Z") -> dict[str, Any]:
    return {
        "kind": "Lease",
        "metadata": {
            "name": f"virtfleet-agent-{node}",
            "namespace": "kube-node-lease",
            "annotations": {SELF_FENCE_ANNOTATION: "10", WATCHDOG_ANNOTATION: "5"},
        },
        "spec": {"renewTime": renew, "leaseDurationSeconds": 10},
    }


def make() -> tuple[Controller, FakeKube]:
    kube = FakeKube(keyed_by_name=True, event_fields=("name", "type", "reason"), clock=lambda: NOW)
    controller = Controller(kube, ControllerSettings(), clock=lambda: NOW)
    for name in ("node-a", "node-b"):
        controller.node_event(None, {"metadata": {"name": name, "labels": {}}})
        controller.host_event(None, host_body(name))
    return controller, kube


def add_vm(
    controller: Controller, kube: FakeKube, name: str, known: str | None = None, **spec: Any
) -> None:
    """A VM running on node-a; ``known``: the policy node-a's agent reported acting on
    (default: the spec's)."""
    policy = known or spec.get("highAvailability", "None")
    body = vm_body(
        name,
        status={"nodeName": "node-a", "printableStatus": "Running", "highAvailability": policy},
        labels={NODE_LABEL: "node-a"},
        **spec,
    )
    body["metadata"]["finalizers"] = ["virtfleet.io/agent-node-a", "example.com/keep"]
    controller.vm_event(None, kube.put(body))


async def test_a_silent_node_is_fenced_then_its_restart_vm_moves_and_others_stay() -> None:
    controller, kube = make()
    lease = kube.put(lease_body("node-a"))
    # Seen 20 s ago: past the node's own deadline (10 s self-fence + 5 s watchdog + 2 s).
    controller.cache.upsert_lease(lease, NOW - timedelta(seconds=20))
    shared_disk = [{"name": "d", "size": "1Gi", "source": {"blank": {}}, "pool": SHARED}]
    add_vm(controller, kube, "ha", highAvailability="Restart", disks=shared_disk)
    add_vm(controller, kube, "plain")
    local_disk = [{"name": "d", "size": "1Gi", "source": {"blank": {}}}]
    add_vm(controller, kube, "local", highAvailability="Restart", disks=local_disk)
    # Made HA after its node last reported: the node may not know, and may not have
    # stopped it.
    add_vm(controller, kube, "unseen", known="None", highAvailability="Restart", disks=shared_disk)

    await controller.nodes.judge("node-a")
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION in stored["metadata"]["annotations"]
    assert ("node-a", "Warning", "NodeFenced") in kube.events
    assert not controller.cache.hosts["node-a"].fresh(NOW, 40)

    kube.calls.clear()
    await controller.reconcile(("ns", "ha"))
    assert [c[0] for c in kube.calls] == ["status", "metadata"]
    status = kube.calls[0][2]
    assert status["nodeName"] == "node-b"
    assert status["failover"]["fromNode"] == "node-a"
    meta = kube.objects[("ns", "ha")]["metadata"]
    assert meta["labels"][NODE_LABEL] == "node-b"
    assert meta["finalizers"] == ["example.com/keep", "virtfleet.io/agent-node-b"]
    assert ("ha", "Warning", "FailedOver") in kube.events

    await controller.reconcile(("ns", "plain"))
    await controller.reconcile(("ns", "local"))
    assert kube.objects[("ns", "plain")]["status"]["printableStatus"] == "Unknown"
    assert kube.objects[("ns", "local")]["status"]["nodeName"] == "node-a"
    assert ("local", "Warning", "DisksNotShared") in kube.events
    await controller.reconcile(("ns", "unseen"))
    assert kube.objects[("ns", "unseen")]["status"]["nodeName"] == "node-a"
    assert ("unseen", "Warning", "SpecNotObserved") in kube.events


async def test_a_renewal_wins_over_the_fence_and_no_vm_moves() -> None:
    controller, kube = make()
    lease = kube.put(lease_body("node-a"))
    controller.cache.upsert_lease(lease, NOW - timedelta(seconds=20))
    kube.put(lease_body("node-a", renew="2026-01-01T12:00:00.000000Z"))  # the agent renewed
    await controller.nodes.judge("node-a")  # its compare-and-swap loses
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION not in stored["metadata"]["annotations"]
    assert controller.nodes.fence_mark("node-a") is None


async def test_the_agent_back_after_a_fence_gets_its_mark_cleared_and_the_node_is_damped() -> None:
    controller, kube = make()
    lease = kube.put(lease_body("node-a"))
    controller.cache.upsert_lease(lease, NOW - timedelta(seconds=20))
    await controller.nodes.judge("node-a")
    fenced = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    back = {**fenced, "spec": {**fenced["spec"], "renewTime": "2026-01-01T12:00:01.000000Z"}}
    controller.cache.upsert_lease(kube.put(back), NOW)
    await controller.nodes.judge("node-a")
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION not in (stored["metadata"].get("annotations") or {})
    assert ("node-a", "Normal", "NodeRecovered") in kube.events
    memory = controller.nodes.memory["node-a"]
    assert memory.placeable_after == NOW + timedelta(seconds=30)


async def test_a_vm_deleted_on_a_fenced_node_does_not_wait_for_that_node() -> None:
    controller, kube = make()
    lease = kube.put(lease_body("node-a"))
    controller.cache.upsert_lease(lease, NOW - timedelta(seconds=20))
    add_vm(controller, kube, "gone")
    await controller.nodes.judge("node-a")
    body = kube.objects[("ns", "gone")]
    body["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    controller.vm_event(None, kube.put(body))
    await controller.reconcile(("ns", "gone"))
    assert kube.objects[("ns", "gone")]["metadata"]["finalizers"] == ["example.com/keep"]
    assert ("gone", "Normal", "FinalizerReleased") in kube.events


async def test_a_controller_blind_for_a_while_measures_silence_from_when_it_sees_again() -> None:
    controller, kube = make()
    kube.put(lease_body("node-a"))
    clock = [NOW - timedelta(seconds=60)]
    controller.nodes.clock = lambda: clock[0]
    await controller.nodes.poll()  # seen 60 s ago, then the apiserver was out of reach
    listing = kube.list

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ApiUnavailable("connection refused")

    kube.list = unreachable  # type: ignore[method-assign]
    clock[0] = NOW - timedelta(seconds=50)
    with pytest.raises(ApiUnavailable):
        await controller.nodes.poll()
    kube.list = listing  # type: ignore[method-assign]
    clock[0] = NOW
    await controller.nodes.poll()
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION not in stored["metadata"]["annotations"]
    assert controller.cache.leases["node-a"].seen == NOW


async def test_a_slow_pass_of_the_controller_is_not_blindness() -> None:
    controller, kube = make()
    kube.put(lease_body("node-a"))
    clock = [NOW - timedelta(seconds=60)]
    controller.nodes.clock = lambda: clock[0]
    await controller.nodes.poll()
    clock[0] = NOW  # 60 s later, every list having worked: the node is silent
    await controller.nodes.poll()
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION in stored["metadata"]["annotations"]


async def test_a_controller_that_did_not_run_for_a_while_is_blind_for_that_time() -> None:
    controller, kube = make()
    kube.put(lease_body("node-a"))
    clock = [NOW - timedelta(seconds=60)]
    controller.nodes.clock = lambda: clock[0]
    await controller.nodes.poll()
    clock[0] = NOW  # its timer fired 59 s late: it was stopped, not the node
    controller.nodes.woke_late(59.0)
    await controller.nodes.poll()
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION not in stored["metadata"]["annotations"]
    assert controller.cache.leases["node-a"].seen == NOW
    controller.nodes.woke_late(1.0)  # a timer a second late is no blindness
    clock[0] = NOW + timedelta(seconds=60)
    await controller.nodes.poll()
    stored = kube.objects[("kube-node-lease", "virtfleet-agent-node-a")]
    assert FENCED_ANNOTATION in stored["metadata"]["annotations"]
