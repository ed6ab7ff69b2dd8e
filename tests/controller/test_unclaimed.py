"""Snapshots and restores no agent owns yet: the controller says why they wait."""

from __future__ import annotations

import importlib.util
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.controller.fleet_builders import NOW

from virtfleet.controller.unclaimed import RESTORE, SNAPSHOT, restore_view, snapshot_view
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.unclaimed import (
    VmPresence,
    unclaimed_restore_status,
    unclaimed_snapshot_status,
)

# The FakeKube and builders of the controller's loop tests (importlib mode: load by path).
_spec = importlib.util.spec_from_file_location(
    "controller_loop_tests", Path(__file__).with_name("test_controller.py")
)
assert _spec is not None
assert _spec.loader is not None
loop_tests = importlib.util.module_from_spec(_spec)
sys.modules["controller_loop_tests"] = loop_tests
_spec.loader.exec_module(loop_tests)


def snap_body(
    name: str = "snap1",
    vm: str = "vm1",
    *,
    status: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    deadline: str | None = None,
    created: str = "2026-01-01T11:59:00Z",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"vmName": vm}
    if deadline:
        spec["failureDeadline"] = deadline
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMSnapshot",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "50",
            "creationTimestamp": created,
            "labels": labels or {},
        },
        "spec": spec,
        "status": status or {},
    }


def restore_body(name: str = "undo", vm: str = "vm1", **kw: Any) -> dict[str, Any]:
    body = snap_body(name, vm, **kw)
    body["kind"] = "VMRestore"
    body["spec"] = {"vmName": vm, "snapshotName": "snap1"}
    return body


def ready(status: Any) -> tuple[str, str]:
    cond = next(c for c in status.conditions if c.type == "Ready")
    return cond.status, cond.reason


# --- decisions --------------------------------------------------------------------------


def test_a_snapshot_of_a_missing_vm_waits_and_says_so() -> None:
    status = unclaimed_snapshot_status(snapshot_view(snap_body()), VmPresence.MISSING, NOW)
    assert status is not None
    assert status.phase == "Pending"
    assert status.ready_to_use is False
    assert ready(status) == ("False", "VMNotFound")
    assert status.node_name is None  # no node is involved yet


def test_a_snapshot_of_an_unplaced_vm_waits_for_placement() -> None:
    status = unclaimed_snapshot_status(snapshot_view(snap_body()), VmPresence.UNPLACED, NOW)
    assert status is not None
    assert ready(status) == ("False", "WaitingForPlacement")


def test_the_failure_deadline_fails_an_unclaimed_snapshot() -> None:
    body = snap_body(deadline="30s", created="2026-01-01T11:59:00Z")
    status = unclaimed_snapshot_status(snapshot_view(body), VmPresence.MISSING, NOW)
    assert status is not None
    assert status.phase == "Failed"
    assert status.error is not None
    assert "failureDeadline 30s" in status.error.message
    early = unclaimed_snapshot_status(
        snapshot_view(body), VmPresence.MISSING, NOW - timedelta(seconds=45)
    )
    assert early is not None
    assert early.phase == "Pending"


def test_a_placed_vm_or_an_agents_phase_is_left_to_the_agent() -> None:
    assert unclaimed_snapshot_status(snapshot_view(snap_body()), VmPresence.PLACED, NOW) is None
    taken = snapshot_view(snap_body(status={"phase": "InProgress"}))
    assert unclaimed_snapshot_status(taken, VmPresence.MISSING, NOW) is None
    done = snapshot_view(snap_body(status={"phase": "Ready"}))
    assert unclaimed_snapshot_status(done, VmPresence.MISSING, NOW) is None


def test_a_restore_of_a_missing_vm_waits() -> None:
    status = unclaimed_restore_status(restore_view(restore_body()), VmPresence.MISSING, NOW)
    assert status is not None
    assert status.phase == "Pending"
    assert ready(status) == ("False", "VMNotFound")
    running = restore_view(restore_body(status={"phase": "InProgress"}))
    assert unclaimed_restore_status(running, VmPresence.MISSING, NOW) is None


# --- the watcher, with the controller's fake API ------------------------------------------


async def test_the_controller_writes_the_waiting_status_with_a_precondition() -> None:
    controller, kube = loop_tests.make()
    body = kube.put(snap_body())
    controller.unclaimed.event(SNAPSHOT, "ADDED", body)
    assert await controller.unclaimed.reconcile((SNAPSHOT, "ns", "snap1")) is None
    stored = kube.objects[("ns", "snap1")]["status"]
    assert stored["phase"] == "Pending"
    assert kube.calls[-1][0] == "status"
    # Nothing changed: nothing written again.
    writes = len(kube.calls)
    await controller.unclaimed.reconcile((SNAPSHOT, "ns", "snap1"))
    assert len(kube.calls) == writes


async def test_a_stale_view_loses_to_the_agents_write() -> None:
    controller, kube = loop_tests.make()
    body = kube.put(snap_body())
    controller.unclaimed.event(SNAPSHOT, "ADDED", body)
    kube.objects[("ns", "snap1")]["metadata"]["resourceVersion"] = "99"  # an agent wrote
    assert await controller.unclaimed.reconcile((SNAPSHOT, "ns", "snap1")) == 1.0
    assert kube.objects[("ns", "snap1")]["status"] == {}


async def test_labelled_objects_and_placed_vms_are_not_the_controllers() -> None:
    controller, kube = loop_tests.make()
    labelled = kube.put(snap_body("mine", labels={NODE_LABEL: "node-a"}))
    controller.unclaimed.event(SNAPSHOT, "ADDED", labelled)
    assert (SNAPSHOT, "ns", "mine") not in controller.unclaimed.cache
    loop_tests.add_vm(controller, kube, name="vm1", status={"nodeName": "node-a"})
    body = kube.put(restore_body())
    controller.unclaimed.event(RESTORE, "ADDED", body)
    assert await controller.unclaimed.reconcile((RESTORE, "ns", "undo")) is None
    assert kube.objects[("ns", "undo")]["status"] == {}
