"""What status the controller writes: pure functions of (vm, placement, host heartbeat)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from tests.controller.fleet_builders import NOW, host, vm

from virtfleet.controller.decisions import (
    NODE_UNREACHABLE,
    WAITING_FOR_AGENT,
    scheduling_note,
    scheduling_status,
    unreachable_note,
    unreachable_status,
)
from virtfleet.reconcile.placement import (
    INSUFFICIENT_CAPACITY,
    INVALID_SPEC,
    UNSCHEDULABLE,
    Placement,
    Unschedulable,
)
from virtfleet.reconcile.views import CachedVm
from virtfleet.runtime.status import apply_merge_patch, status_patch

T0 = "2026-01-01T12:00:00Z"
T1 = "2026-01-01T12:05:00Z"


def conditions(status: dict[str, object]) -> dict[str, dict[str, Any]]:
    listed = cast(list[dict[str, Any]], status["conditions"])
    return {c["type"]: c for c in listed}


def test_placed_vm_shows_starting_and_waits_for_its_agent() -> None:
    status = scheduling_status(vm(), Placement("node-a", 0), now=T0)
    assert status["nodeName"] == "node-a"
    assert status["printableStatus"] == "Starting"
    c = conditions(status)
    assert c["Ready"] == {
        "type": "Ready",
        "status": "False",
        "reason": WAITING_FOR_AGENT,
        "message": "placed on node-a; waiting for its agent",
        "lastTransitionTime": T0,
        "observedGeneration": 3,
    }
    assert c["Reconciling"]["status"] == "True"
    assert "Stalled" not in c


def test_placed_halted_vm_shows_stopped() -> None:
    for strategy in ("Halted", "Manual"):
        status = scheduling_status(vm(run_strategy=strategy), Placement("node-a", 0), now=T0)
        assert status["printableStatus"] == "Stopped"


def test_unschedulable_waits_and_reconciles() -> None:
    status = scheduling_status(vm(), Unschedulable(UNSCHEDULABLE, "why"), now=T0)
    assert status["printableStatus"] == "Scheduling"
    assert "nodeName" not in status
    c = conditions(status)
    assert (c["Ready"]["status"], c["Ready"]["reason"], c["Ready"]["message"]) == (
        "False",
        UNSCHEDULABLE,
        "why",
    )
    assert (c["Reconciling"]["status"], c["Reconciling"]["reason"]) == ("True", UNSCHEDULABLE)
    assert "Stalled" not in c


def test_insufficient_capacity_is_stalled_not_reconciling() -> None:
    status = scheduling_status(vm(), Unschedulable(INSUFFICIENT_CAPACITY, "too big"), now=T0)
    c = conditions(status)
    assert (c["Stalled"]["status"], c["Stalled"]["reason"]) == ("True", INSUFFICIENT_CAPACITY)
    assert c["Ready"]["reason"] == INSUFFICIENT_CAPACITY
    assert "Reconciling" not in c


def test_invalid_spec_is_stalled() -> None:
    status = scheduling_status(vm(), Unschedulable(INVALID_SPEC, "bad"), now=T0)
    assert conditions(status)["Stalled"]["reason"] == INVALID_SPEC


def test_a_retry_with_the_same_outcome_writes_nothing() -> None:
    first = scheduling_status(vm(), Unschedulable(UNSCHEDULABLE, "why"), now=T0)
    again = scheduling_status(vm(status=first), Unschedulable(UNSCHEDULABLE, "why"), now=T1)
    assert status_patch(first, again) is None


def test_a_new_reason_keeps_the_transition_time_of_an_unchanged_status() -> None:
    first = scheduling_status(vm(), Unschedulable(UNSCHEDULABLE, "why"), now=T0)
    second = scheduling_status(
        vm(status=first), Unschedulable(INSUFFICIENT_CAPACITY, "big"), now=T1
    )
    c = conditions(second)
    assert c["Ready"]["lastTransitionTime"] == T0  # still False
    assert c["Stalled"]["lastTransitionTime"] == T1  # new
    patch = status_patch(first, second)
    assert patch is not None
    assert apply_merge_patch(first, patch) == second


def test_placing_after_waiting_clears_stalled_and_keeps_agent_fields() -> None:
    waited = scheduling_status(vm(), Unschedulable(INSUFFICIENT_CAPACITY, "big"), now=T0)
    waited["restartCount"] = 2  # a field someone else owns
    placed = scheduling_status(vm(status=waited), Placement("node-b", 0), now=T1)
    assert "Stalled" not in conditions(placed)
    assert placed["restartCount"] == 2
    patch = status_patch(waited, placed)
    assert patch is not None
    assert "restartCount" not in patch


def test_observed_generation_follows_metadata() -> None:
    status = scheduling_status(vm(generation=7), Placement("node-a", 0), now=T0)
    assert {c["observedGeneration"] for c in status["conditions"]} == {7}


def test_notes_only_when_the_reason_changes() -> None:
    fresh = vm()
    assert scheduling_note(fresh.status, Placement("node-a", 0)) is not None
    first = scheduling_note(fresh.status, Unschedulable(UNSCHEDULABLE, "why"))
    assert first is not None
    assert (first.type, first.reason, first.message) == ("Warning", UNSCHEDULABLE, "why")
    stored = scheduling_status(fresh, Unschedulable(UNSCHEDULABLE, "why"), now=T0)
    assert scheduling_note(stored, Unschedulable(UNSCHEDULABLE, "other numbers")) is None
    changed = scheduling_note(stored, Unschedulable(INSUFFICIENT_CAPACITY, "big"))
    assert changed is not None
    assert changed.reason == INSUFFICIENT_CAPACITY


def placed_vm(**kwargs: object) -> CachedVm:
    status = {"nodeName": "node-a", "printableStatus": "Running", "conditions": []}
    return vm(status=status, **kwargs)


def test_a_live_host_changes_nothing() -> None:
    assert unreachable_status(placed_vm(), host("node-a", age=5), now=NOW,
                              heartbeat_timeout=40) is None  # fmt: skip


def test_a_silent_host_makes_its_vms_unknown() -> None:
    the_vm = placed_vm()
    status = unreachable_status(
        the_vm, host("node-a", age=100), now=NOW, heartbeat_timeout=40, timestamp=T0
    )
    assert status is not None
    assert status["printableStatus"] == "Unknown"
    assert status["nodeName"] == "node-a"
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("Unknown", NODE_UNREACHABLE)
    assert ready["message"] == (
        "node node-a is unreachable: agent heartbeat stale since 2026-01-01T11:58:20Z (timeout 40s)"
    )
    note = unreachable_note(the_vm.status, status)
    assert note is not None
    assert note.reason == NODE_UNREACHABLE
    # the next pass (later, same silence) writes nothing and says nothing
    later = unreachable_status(
        vm(status=status), host("node-a", age=100), now=NOW + timedelta(seconds=100),
        heartbeat_timeout=40, timestamp=T1,
    )  # fmt: skip
    assert later is not None
    # same heartbeat → same message; only the clock moved
    assert status_patch(status, later) is None
    assert unreachable_note(status, later) is None


def test_a_missing_vmhost_is_unreachable_too() -> None:
    status = unreachable_status(placed_vm(), None, now=NOW, heartbeat_timeout=40, timestamp=T0)
    assert status is not None
    assert "its VMHost does not exist" in conditions(status)["Ready"]["message"]


def test_unplaced_vms_are_not_judged_by_heartbeat() -> None:
    assert unreachable_status(vm(), None, now=NOW, heartbeat_timeout=40) is None
