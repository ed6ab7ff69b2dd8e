"""The reconcile loop with a fake API: write order, preconditions, repairs, events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.controller.fleet_builders import GI, NOW, vm_body

from testkit.kube import FakeKube
from virtfleet.controller.controller import CONFLICT_RETRY, Controller
from virtfleet.controller.settings import ControllerSettings
from virtfleet.identity import NODE_LABEL


def host_body(
    name: str,
    memory_gi: int = 8,
    heartbeat: str = "2026-01-01T11:59:55Z",
    tunnel: str | None = "192.0.2.10",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "memoryBytes": memory_gi * GI,
            "heartbeatTime": heartbeat,
            **({"tunnelAddress": tunnel} if tunnel else {}),
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady"}],
        },
    }


def node_body(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}}


def make(clock: datetime = NOW) -> tuple[Controller, FakeKube]:
    # Objects by (namespace, name), Events as (name, type, reason), the controller's clock.
    kube = FakeKube(
        keyed_by_name=True, event_fields=("name", "type", "reason"), clock=lambda: clock
    )
    controller = Controller(kube, ControllerSettings(), clock=lambda: clock)
    for name in ("node-a", "node-b"):
        controller.node_event(None, node_body(name))
        controller.host_event(None, host_body(name))
    return controller, kube


def add_vm(controller: Controller, kube: FakeKube, **kwargs: Any) -> dict[str, Any]:
    body = kube.put(vm_body(**kwargs))
    controller.vm_event(None, body)
    return body


async def test_placement_writes_status_first_then_the_label() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="a")
    assert await controller.reconcile(("ns", "a")) is None
    assert [c[0] for c in kube.calls] == ["status", "metadata"]
    assert kube.calls[0][2]["nodeName"] == "node-a"
    # The label and the node agent's finalizer in one write: one apiserver write less.
    assert kube.calls[1][2] == {
        "labels": {NODE_LABEL: "node-a"},
        "finalizers": ["virtfleet.io/agent-node-a"],
    }
    assert kube.events == [("a", "Normal", "Scheduled")]
    cached = controller.cache.vms[("ns", "a")]
    assert cached.node_name == "node-a"
    assert cached.node_label == "node-a"


async def test_back_to_back_placements_spread_through_the_cache() -> None:
    controller, kube = make()
    for name in ("a", "b", "c", "d"):
        add_vm(controller, kube, name=name, memory="2Gi")
    for name in ("a", "b", "c", "d"):
        await controller.reconcile(("ns", name))
    nodes = [controller.cache.vms[("ns", n)].node_name for n in ("a", "b", "c", "d")]
    assert nodes == ["node-a", "node-b", "node-a", "node-b"]
    assert controller.cache.allocated() == {"node-a": 4 * GI, "node-b": 4 * GI}


async def test_a_stale_cached_object_loses_the_race_and_retries() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="a")
    kube.objects[("ns", "a")]["metadata"]["resourceVersion"] = "999"  # someone wrote meanwhile
    assert await controller.reconcile(("ns", "a")) == CONFLICT_RETRY
    assert kube.calls == []


async def test_unschedulable_retries_and_tells_once() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="big", memory="1Ti")
    retry = ControllerSettings().retry_interval
    assert await controller.reconcile(("ns", "big")) == retry
    assert await controller.reconcile(("ns", "big")) == retry
    assert [c[0] for c in kube.calls] == ["status"]  # the second pass changed nothing
    assert kube.events == [("big", "Warning", "InsufficientCapacity")]


async def test_a_crash_between_the_two_writes_is_repaired() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="a", status={"nodeName": "node-b"},
           labels={NODE_LABEL: "node-a"})  # fmt: skip
    await controller.reconcile(("ns", "a"))
    # A relabel (a migration's hand-over) leaves the finalizers to the agents.
    assert kube.calls == [("metadata", "a", {"labels": {NODE_LABEL: "node-b"}})]


async def test_the_first_placement_keeps_other_finalizers_and_loses_a_race() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="a", status={"nodeName": "node-a"})
    kube.objects[("ns", "a")]["metadata"]["finalizers"] = ["example.com/keep"]
    controller.vm_event(None, kube.objects[("ns", "a")])
    await controller.reconcile(("ns", "a"))
    assert kube.objects[("ns", "a")]["metadata"]["finalizers"] == [
        "example.com/keep",
        "virtfleet.io/agent-node-a",
    ]
    # The finalizer list is replaced as a whole: a stale view must not win.
    add_vm(controller, kube, name="b", status={"nodeName": "node-a"})
    kube.objects[("ns", "b")]["metadata"]["resourceVersion"] = "999"
    assert await controller.reconcile(("ns", "b")) == CONFLICT_RETRY
    assert not kube.objects[("ns", "b")]["metadata"].get("labels")


async def test_a_silent_host_marks_its_vms_unknown_once() -> None:
    controller, kube = make()
    controller.host_event(None, host_body("node-a", heartbeat="2026-01-01T11:50:00Z"))
    add_vm(controller, kube, name="a", status={"nodeName": "node-a", "printableStatus": "Running"},
           labels={NODE_LABEL: "node-a"})  # fmt: skip
    add_vm(controller, kube, name="b", status={"nodeName": "node-b", "printableStatus": "Running"},
           labels={NODE_LABEL: "node-b"})  # fmt: skip
    assert controller.check_heartbeats() == 1
    await controller.reconcile(("ns", "a"))
    await controller.reconcile(("ns", "b"))
    assert [(c[0], c[1]) for c in kube.calls] == [("status", "a")]
    assert kube.calls[0][2]["printableStatus"] == "Unknown"
    assert kube.events == [("a", "Warning", "NodeUnreachable")]
    await controller.reconcile(("ns", "a"))
    assert len(kube.calls) == 1
    assert controller.check_heartbeats() == 0  # already Unknown: not re-queued


async def test_deleting_and_vanished_vms_are_left_alone() -> None:
    controller, kube = make()
    body = vm_body(name="gone")
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    controller.vm_event(None, kube.put(body))
    assert await controller.reconcile(("ns", "gone")) is None
    assert await controller.reconcile(("ns", "never")) is None
    assert kube.calls == []


async def test_older_watch_events_do_not_roll_back_our_writes() -> None:
    controller, kube = make()
    old = add_vm(controller, kube, name="a")
    await controller.reconcile(("ns", "a"))
    controller.vm_event("MODIFIED", old)  # the watch delivers the pre-placement object late
    assert controller.cache.vms[("ns", "a")].node_name == "node-a"


async def test_deleting_a_placed_vm_requeues_the_waiting_ones() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="placed", status={"nodeName": "node-a"},
           labels={NODE_LABEL: "node-a"})  # fmt: skip
    add_vm(controller, kube, name="waiting", memory="1Ti")
    controller.vm_event("DELETED", kube.objects[("ns", "placed")])
    assert ("ns", "placed") not in controller.cache.vms
    assert len(controller.queue) == 2  # both were queued by their events; waiting stays queued


def test_importing_registers_nothing_globally() -> None:
    import kopf

    from virtfleet.controller import controller as module

    assert module is not None
    default = kopf.get_default_registry()
    assert not any(
        "virtfleet" in str(getattr(h.fn, "__module__", ""))
        for h in default._watching.get_all_handlers()
    )


def test_the_registry_holds_event_handlers_only() -> None:
    """And so kopf's diff base may be skipped (runtime.kopfsettings.WatchOnlyDiffBase)."""
    controller = Controller(FakeKube())
    registry = controller.registry()
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    # VMs, VMHosts, VMMigrations, VMNetworks, VMSnapshots, VMRestores, VMBackups,
    # VMBackupSchedules, VMBackupLocations, Nodes
    assert len(registry._watching.get_all_handlers()) == 10
