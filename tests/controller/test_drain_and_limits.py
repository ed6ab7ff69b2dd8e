"""The controller's node drain and its limits on parallel migrations (fake API)."""

from __future__ import annotations

from typing import Any

from tests.controller.test_controller import add_vm, make, node_body

from testkit.kube import FakeKube
from virtfleet.controller.controller import Controller
from virtfleet.identity import NODE_LABEL


def placed(controller: Controller, kube: FakeKube, name: str, strategy: str, **kw: Any) -> None:
    add_vm(
        controller,
        kube,
        name=name,
        status={"nodeName": "node-a", "printableStatus": "Running"},
        labels={NODE_LABEL: "node-a"},
        evictionStrategy=strategy,
        **kw,
    )


def cordon(controller: Controller, name: str) -> None:
    controller.node_event("MODIFIED", {**node_body(name), "spec": {"unschedulable": True}})


async def drain_all(controller: Controller) -> None:
    for key in list(controller.cache.vms):
        await controller.reconcile(key)


async def test_cordon_creates_one_migration_per_live_migrate_vm_and_reports_the_rest() -> None:
    controller, kube = make()
    placed(controller, kube, "mobile", "LiveMigrate")
    placed(controller, kube, "anchored", "None")
    await drain_all(controller)
    assert not [c for c in kube.calls if c[0] == "create"]  # not cordoned yet

    cordon(controller, "node-a")
    await drain_all(controller)
    created = [c for c in kube.calls if c[0] == "create"]
    assert [c[1] for c in created] == ["mobile-evict-node-a"]
    body = created[0][2]
    assert body["metadata"]["labels"] == {"virtfleet.io/eviction": "node-a"}
    assert body["spec"] == {"vmName": "mobile", "mode": "Live"}
    assert ("anchored", "Warning", "EvictionBlocked") in kube.events
    assert ("node-a", "Warning", "EvictionBlocked") in kube.events
    assert ("mobile", "Normal", "Evicting") in kube.events

    # Again (a resync): nothing new, no repeated Events.
    events = len(kube.events)
    await drain_all(controller)
    assert len([c for c in kube.calls if c[0] == "create"]) == 1
    assert len(kube.events) == events


async def test_a_restarted_controller_does_not_duplicate_the_migration() -> None:
    controller, kube = make()
    placed(controller, kube, "mobile", "LiveMigrate")
    cordon(controller, "node-a")
    await drain_all(controller)
    again, _ = make()
    again.kube = kube
    again.vm_event(None, kube.objects[("ns", "mobile")])
    cordon(again, "node-a")
    await drain_all(again)  # its migration cache is empty: the create conflicts
    assert len([c for c in kube.calls if c[0] == "create"]) == 1
    assert len([o for k, o in kube.objects.items() if k[1].endswith("-evict-node-a")]) == 1


async def test_stopped_vms_are_not_migrated() -> None:
    controller, kube = make()
    add_vm(
        controller,
        kube,
        name="off",
        status={"nodeName": "node-a", "printableStatus": "Stopped"},
        labels={NODE_LABEL: "node-a"},
        evictionStrategy="LiveMigrate",
    )
    cordon(controller, "node-a")
    await drain_all(controller)
    assert not [c for c in kube.calls if c[0] == "create"]


def migration_body(name: str, vm: str, phase: str | None = None, source: str = "node-a") -> Any:
    status = {} if phase is None else {"phase": phase, "sourceNode": source}
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "generation": 1,
            "resourceVersion": "1",
            "creationTimestamp": "2026-01-01T11:00:00Z",
        },
        "spec": {"vmName": vm, "targetNode": "node-b"},
        "status": status,
    }


async def test_per_node_limit_makes_migrations_wait_until_a_slot_frees() -> None:
    controller, kube = make()
    for vm in ("v1", "v2", "v3"):
        placed(controller, kube, vm, "None")
    sched = controller.migrations
    for i, vm in enumerate(("v1", "v2", "v3")):
        body = kube.put("VMMigration", migration_body(f"m{i}", vm))
        sched.event("ADDED", body)
    assert await sched.reconcile(("ns", "m0")) is None
    assert await sched.reconcile(("ns", "m1")) is None
    retry = await sched.reconcile(("ns", "m2"))
    assert retry == sched.WAIT_RETRY
    phases = {k[1]: (o.get("status") or {}).get("phase") for k, o in sched.cache.items()}
    assert phases == {"m0": "Scheduled", "m1": "Scheduled", "m2": "Pending"}
    waiting = sched.cache[("ns", "m2")]["status"]
    assert any(c["reason"] == "NodeLimitReached" for c in waiting["conditions"])

    # m0 ends: its event wakes m2, which now gets the slot.
    done = dict(sched.cache[("ns", "m0")])
    done["status"] = {**done["status"], "phase": "Succeeded"}
    sched.event("MODIFIED", done)
    assert ("ns", "m2") in sched.queue._dirty
    assert await sched.reconcile(("ns", "m2")) is None
    assert sched.cache[("ns", "m2")]["status"]["phase"] == "Scheduled"


async def test_cluster_limit_counts_every_node() -> None:
    controller, kube = make()
    placed(controller, kube, "v9", "None")
    sched = controller.migrations
    for i in range(5):
        body = migration_body(f"busy{i}", f"o{i}", "Running", source=f"n{i}")
        sched.event("ADDED", body)
    sched.event("ADDED", kube.put("VMMigration", migration_body("late", "v9")))
    assert await sched.reconcile(("ns", "late")) == sched.WAIT_RETRY
    conds = sched.cache[("ns", "late")]["status"]["conditions"]
    assert any(c["reason"] == "ClusterLimitReached" for c in conds)
