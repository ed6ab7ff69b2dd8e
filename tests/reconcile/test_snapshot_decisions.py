"""The VMSnapshot/VMRestore policy as pure functions: every rule without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from virtfleet.api.snapshot import (
    RestorePhase,
    SnapshotPhase,
    VMRestoreSpec,
    VMRestoreStatus,
    VMSnapshotSpec,
    VMSnapshotStatus,
)
from virtfleet.api.virtualmachine import RunStrategy
from virtfleet.reconcile.restore import (
    DestroyDomain,
    MarkDomain,
    Revert,
    StartDomain,
    active_restore,
    decide_restore,
)
from virtfleet.reconcile.snapshot import DeleteSnapshot, TakeSnapshot, decide_snapshot
from virtfleet.reconcile.snapshot_migration import (
    SnapshotOnNode,
    migration_snapshot_plan,
    snapshots_block_migration,
)
from virtfleet.reconcile.snapshot_types import (
    Adopt,
    DomainFacts,
    LibvirtSnapshot,
    RedefineSnapshot,
    RestoreView,
    SnapshotRef,
    SnapshotView,
    VmRef,
    libvirt_snapshot_name,
)
from virtfleet.reconcile.vm import Power

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SNAP_UID = "5a5a5a5a-0000-4000-8000-000000000001"
VM_UID = "11111111-2222-4333-8444-555555555555"
NAME = libvirt_snapshot_name(SNAP_UID)
VM = VmRef(name="vm", uid=VM_UID, run_strategy=RunStrategy.ALWAYS)
RUNNING = DomainFacts(defined=True, power=Power.RUNNING, reason="booted")
STOPPED = DomainFacts(defined=True, power=Power.STOPPED, reason="shutdown")


def snap(
    status: VMSnapshotStatus | None = None,
    *,
    adopted: bool = True,
    deleting: bool = False,
    created: datetime = NOW,
    **spec: Any,
) -> SnapshotView:
    return SnapshotView(
        namespace="ns",
        name="s",
        uid=SNAP_UID,
        generation=1,
        created=created,
        spec=VMSnapshotSpec.model_validate({"vmName": "vm", **spec}),
        status=status or VMSnapshotStatus(),
        deleting=deleting,
        adopted=adopted,
    )


def taken(state: str = "running", memory: bool = True) -> LibvirtSnapshot:
    return LibvirtSnapshot(NAME, state, memory, int(NOW.timestamp()))


def cond(status: Any, kind: str) -> tuple[str, str] | None:
    for c in status.conditions:
        if c.type == kind:
            return c.status.value, c.reason
    return None


# --- VMSnapshot ---------------------------------------------------------------------------


def test_snapshot_name_is_derived_from_the_uid() -> None:
    assert libvirt_snapshot_name(SNAP_UID) == f"vf-{SNAP_UID}"


def test_a_new_snapshot_is_adopted_before_anything_is_taken() -> None:
    d = decide_snapshot(snap(adopted=False), VM, RUNNING, "node-a", NOW)
    assert d.actions == (Adopt("vm", VM_UID, finalizer=True),)
    assert d.status.phase is SnapshotPhase.PENDING
    assert not d.write_status_first


def test_running_vm_records_intent_then_takes_memory() -> None:
    d = decide_snapshot(snap(), VM, RUNNING, "node-a", NOW)
    assert d.write_status_first
    assert d.actions == (TakeSnapshot(NAME, memory=True, quiesce=False),)
    s = d.status
    assert (s.phase, s.memory_included, s.snapshot_name, s.node_name, s.vm_uid) == (
        SnapshotPhase.IN_PROGRESS,
        True,
        NAME,
        "node-a",
        VM_UID,
    )
    assert cond(s, "Reconciling") == ("True", "InProgress")
    assert cond(s, "Ready") == ("False", "InProgress")


def test_disks_only_on_request_still_saves_memory_in_libvirt_but_not_in_the_promise() -> None:
    # QEMU refuses an internal snapshot of a running VM without memory.
    d = decide_snapshot(snap(includeMemory=False), VM, RUNNING, "node-a", NOW)
    assert d.actions == (TakeSnapshot(NAME, memory=True, quiesce=False),)
    assert d.status.memory_included is False


def test_stopped_vm_has_no_memory_to_save() -> None:
    d = decide_snapshot(snap(includeMemory=True), VM, STOPPED, "node-a", NOW)
    assert d.actions == (TakeSnapshot(NAME, memory=False, quiesce=False),)
    d = decide_snapshot(snap(quiesce=True), VM, STOPPED, "node-a", NOW)
    assert d.actions == (TakeSnapshot(NAME, memory=False, quiesce=False),)
    assert d.status.memory_included is False


def test_existing_libvirt_snapshot_makes_it_ready() -> None:
    intent = VMSnapshotStatus(phase=SnapshotPhase.IN_PROGRESS, memory_included=True)
    dom = RunningWith(taken(), xml="<domainsnapshot/>", disks=(("data", 16, 4),))
    d = decide_snapshot(snap(intent), VM, dom, "node-a", NOW)
    s = d.status
    assert d.actions == ()
    assert (s.phase, s.ready_to_use, s.memory_included, s.domain_state) == (
        SnapshotPhase.READY,
        True,
        True,
        "running",
    )
    assert s.snapshot_xml == "<domainsnapshot/>"
    assert [(x.name, x.size_bytes, x.allocation_bytes) for x in s.disks] == [("data", 16, 4)]
    assert s.creation_time == "2026-01-01T12:00:00Z"
    assert cond(s, "Ready") == ("True", "Ready")
    assert cond(s, "Reconciling") is None
    assert [e.reason for e in d.events] == ["SnapshotTaken"]


def RunningWith(  # noqa: N802 - reads like a constructor
    info: LibvirtSnapshot | None, *, xml: str | None = None, disks: Any = ()
) -> DomainFacts:
    return DomainFacts(
        defined=True,
        power=Power.RUNNING,
        reason="booted",
        snapshot=info,
        snapshot_xml=xml,
        current_snapshot=info.name if info else None,
        disks=disks,
    )


def test_interrupted_snapshot_is_taken_again_with_the_recorded_choice() -> None:
    intent = VMSnapshotStatus(phase=SnapshotPhase.IN_PROGRESS, memory_included=False)
    d = decide_snapshot(snap(intent), VM, RUNNING, "node-a", NOW)
    assert d.actions == (TakeSnapshot(NAME, memory=True, quiesce=False),)
    assert d.status.memory_included is False


def test_failure_deadline() -> None:
    old = NOW - timedelta(minutes=10)
    d = decide_snapshot(
        snap(created=old, failureDeadline="5m"),
        VM,
        DomainFacts(defined=False),
        "node-a",
        NOW,
    )
    assert d.status.phase is SnapshotPhase.FAILED
    assert cond(d.status, "Stalled") == ("True", "DeadlineExceeded")
    assert d.status.error is not None
    # Within the deadline it waits.
    d = decide_snapshot(snap(failureDeadline="5m"), VM, DomainFacts(defined=False), "n", NOW)
    assert d.status.phase is SnapshotPhase.PENDING
    assert d.requeue_after


def test_failed_is_terminal() -> None:
    failed = VMSnapshotStatus(phase=SnapshotPhase.FAILED)
    assert decide_snapshot(snap(failed), VM, RUNNING, "n", NOW).actions == ()


def test_ready_snapshot_whose_metadata_was_lost_is_redefined() -> None:
    ready = VMSnapshotStatus(phase=SnapshotPhase.READY, ready_to_use=True, snapshot_xml="<x/>")
    d = decide_snapshot(snap(ready), VM, RUNNING, "n", NOW)
    assert d.actions == (RedefineSnapshot(NAME, "<x/>"),)
    assert [e.reason for e in d.events] == ["SnapshotRedefined"]
    lost = VMSnapshotStatus(phase=SnapshotPhase.READY, ready_to_use=True)
    d = decide_snapshot(snap(lost), VM, RUNNING, "n", NOW)
    assert d.status.phase is SnapshotPhase.FAILED
    assert cond(d.status, "Stalled") == ("True", "SnapshotLost")


def test_ready_snapshot_with_its_libvirt_snapshot_is_quiet() -> None:
    ready = VMSnapshotStatus(phase=SnapshotPhase.READY, ready_to_use=True, snapshot_xml="<x/>")
    d = decide_snapshot(snap(ready), VM, RunningWith(taken()), "n", NOW)
    assert (d.actions, d.events) == ((), ())


@pytest.mark.parametrize(("policy", "deletes"), [("Delete", True), ("Retain", False)])
def test_deletion_policy(policy: str, deletes: bool) -> None:
    d = decide_snapshot(
        snap(deleting=True, deletionPolicy=policy), VM, RunningWith(taken()), "n", NOW
    )
    assert d.finalized
    assert d.actions == ((DeleteSnapshot(NAME),) if deletes else ())


def test_deletion_after_the_vm_is_gone_releases_the_finalizer() -> None:
    d = decide_snapshot(snap(deleting=True), None, DomainFacts(defined=False), "n", NOW)
    assert (d.actions, d.finalized) == ((), True)


def test_snapshot_of_a_replaced_vm_fails() -> None:
    old = VMSnapshotStatus(phase=SnapshotPhase.READY, vm_uid="another-uid")
    d = decide_snapshot(snap(old), VM, RUNNING, "n", NOW)
    assert d.status.phase is SnapshotPhase.FAILED
    assert cond(d.status, "Stalled") == ("True", "VMReplaced")


def test_snapshot_waits_while_a_restore_runs() -> None:
    d = decide_snapshot(snap(), VM, RUNNING, "n", NOW, blocked_by="VMRestore r is in progress")
    assert d.actions == ()
    assert d.status.phase is SnapshotPhase.PENDING
    assert cond(d.status, "Reconciling") == ("True", "Waiting")


# --- VMRestore ----------------------------------------------------------------------------

RESTORE_UID = "7e7e7e7e-0000-4000-8000-000000000002"


def restore(
    status: VMRestoreStatus | None = None, *, name: str = "r", created: datetime = NOW
) -> RestoreView:
    return RestoreView(
        namespace="ns",
        name=name,
        uid=RESTORE_UID if name == "r" else f"{name}-uid",
        generation=1,
        created=created,
        spec=VMRestoreSpec(vm_name="vm", snapshot_name="s"),
        status=status or VMRestoreStatus(),
        adopted=True,
    )


def ready_snapshot(**over: Any) -> SnapshotRef:
    values: dict[str, Any] = {
        "name": "s",
        "vm_name": "vm",
        "vm_uid": VM_UID,
        "phase": SnapshotPhase.READY,
        "ready_to_use": True,
        "libvirt_name": NAME,
        "memory_included": True,
        "snapshot_xml": "<x/>",
    }
    values.update(over)
    return SnapshotRef(**values)


def dom(
    *,
    marker: str | None = None,
    current: str | None = NAME,
    power: Power = Power.RUNNING,
    reason: str = "booted",
    info: LibvirtSnapshot | None = None,
) -> DomainFacts:
    return DomainFacts(
        defined=True,
        power=power,
        reason=reason,
        snapshot=info or taken(),
        restore_marker=marker,
        current_snapshot=current,
    )


def decide(r: RestoreView, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "vm": VM,
        "snapshot": ready_snapshot(),
        "dom": dom(),
        "node": "node-a",
        "now": NOW,
    }
    args.update(kw)
    return decide_restore(r, **args)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"snapshot": None}, "SnapshotNotFound"),
        ({"snapshot": ready_snapshot(phase=SnapshotPhase.IN_PROGRESS)}, "SnapshotNotReady"),
        ({"snapshot": ready_snapshot(ready_to_use=False)}, "SnapshotNotReady"),
        ({"snapshot": ready_snapshot(vm_name="other")}, "SnapshotOfAnotherVM"),
        ({"snapshot": ready_snapshot(vm_uid="earlier-vm")}, "SnapshotOfAnotherVM"),
        ({"snapshot": ready_snapshot(deleting=True)}, "SnapshotDeleting"),
        ({"busy_with": "r0"}, "RestoreInProgress"),
        ({"migrations": ("m1",)}, "MigrationInProgress"),
        ({"vm": VmRef("vm", VM_UID, RunStrategy.ALWAYS, deleting=True)}, "VMDeleting"),
    ],
)
def test_refusals_fail_with_a_reason_and_never_act(kw: dict[str, Any], reason: str) -> None:
    d = decide(restore(), **kw)
    assert d.status.phase is RestorePhase.FAILED
    assert cond(d.status, "Stalled") == ("True", reason)
    assert cond(d.status, "Ready") == ("False", reason)
    assert not any(isinstance(a, (MarkDomain, Revert)) for a in d.actions)
    assert d.status.error is not None
    assert [e.reason for e in d.events] == [reason]


def test_first_the_domain_is_marked_then_intent_is_stored_then_reverted() -> None:
    d = decide(restore())
    assert d.actions == (MarkDomain(RESTORE_UID),)
    assert not d.write_status_first

    d = decide(restore(), dom=dom(marker=RESTORE_UID))
    assert d.write_status_first
    assert d.actions == (Revert(NAME, running=True),)
    s = d.status
    assert (s.phase, s.snapshot_name, s.vm_uid, s.memory_restored, s.start_time) == (
        RestorePhase.IN_PROGRESS,
        NAME,
        VM_UID,
        True,
        "2026-01-01T12:00:00Z",
    )


def in_progress(memory: bool = True) -> VMRestoreStatus:
    return VMRestoreStatus(
        phase=RestorePhase.IN_PROGRESS, snapshot_name=NAME, vm_uid=VM_UID, memory_restored=memory
    )


def test_interrupted_before_the_revert_reverts_once() -> None:
    d = decide(restore(in_progress()), dom=dom(marker=RESTORE_UID))
    assert d.actions == (Revert(NAME, running=True),)
    assert not d.write_status_first


def test_interrupted_after_the_revert_never_reverts_again() -> None:
    d = decide(restore(in_progress()), dom=dom(marker=None, reason="from-snapshot"))
    assert d.actions == ()
    assert d.status.phase is RestorePhase.SUCCEEDED
    assert d.status.complete is True
    assert cond(d.status, "Ready") == ("True", "Restored")
    assert cond(d.status, "Reconciling") is None


def test_unprovable_revert_fails_cleanly() -> None:
    d = decide(restore(in_progress()), dom=dom(marker=None, current="vf-other"))
    assert d.actions == ()
    assert d.status.phase is RestorePhase.FAILED
    assert cond(d.status, "Stalled") == ("True", "Interrupted")


def test_domain_gone_during_restore_fails() -> None:
    d = decide(restore(in_progress()), dom=DomainFacts(defined=False))
    assert d.status.phase is RestorePhase.FAILED


def test_disks_only_restore_of_a_memory_snapshot_lands_paused_then_boots() -> None:
    snapshot = ready_snapshot(memory_included=False)
    d = decide(restore(), snapshot=snapshot, dom=dom(marker=RESTORE_UID))
    assert d.actions == (Revert(NAME, running=False),)
    assert d.status.memory_restored is False
    # Reverted: paused at the snapshot → powered off → started (runStrategy Always).
    r = restore(in_progress(memory=False))
    paused = dom(power=Power.PAUSED, reason="from-snapshot")
    assert decide(r, snapshot=snapshot, dom=paused).actions == (DestroyDomain(_any()),)
    off = dom(power=Power.STOPPED, reason="destroyed")
    assert decide(r, snapshot=snapshot, dom=off).actions == (StartDomain(_any()),)
    booted = dom(power=Power.RUNNING, reason="booted")
    assert decide(r, snapshot=snapshot, dom=booted).status.phase is RestorePhase.SUCCEEDED


def test_disks_restore_of_a_halted_vm_stays_off() -> None:
    halted = VmRef("vm", VM_UID, RunStrategy.HALTED)
    snapshot = ready_snapshot(memory_included=False)
    shutoff = taken(state="shutoff", memory=False)
    d = decide(restore(), vm=halted, snapshot=snapshot, dom=dom(marker=RESTORE_UID, info=shutoff))
    assert d.actions == (Revert(NAME, running=None),)
    off = dom(power=Power.STOPPED, reason="from-snapshot", info=shutoff)
    d = decide(restore(in_progress(memory=False)), vm=halted, snapshot=snapshot, dom=off)
    assert d.actions == ()
    assert d.status.phase is RestorePhase.SUCCEEDED


def test_memory_snapshot_restored_to_a_halted_vm_is_disks_only() -> None:
    halted = VmRef("vm", VM_UID, RunStrategy.HALTED)
    d = decide(restore(), vm=halted, dom=dom(marker=RESTORE_UID))
    assert d.status.memory_restored is False
    assert d.actions == (Revert(NAME, running=False),)


def test_lost_libvirt_metadata_is_redefined_before_restoring() -> None:
    facts = DomainFacts(defined=True, power=Power.RUNNING, snapshot=None)
    d = decide(restore(), dom=facts)
    assert d.actions == (RedefineSnapshot(NAME, "<x/>"),)
    assert d.status.phase is None


def test_terminal_restores_do_nothing_and_a_new_one_may_reuse_the_snapshot() -> None:
    done = VMRestoreStatus(phase=RestorePhase.SUCCEEDED)
    assert decide(restore(done)).actions == ()
    again = decide(restore(name="r2"))
    assert again.actions == (MarkDomain("r2-uid"),)


def test_one_restore_at_a_time_oldest_first() -> None:
    a = restore(name="a", created=NOW)
    b = restore(name="b", created=NOW - timedelta(seconds=1))
    assert active_restore([a, b]) is b
    running = restore(VMRestoreStatus(phase=RestorePhase.IN_PROGRESS), name="c")
    assert active_restore([a, b, running]) is running
    assert active_restore([restore(VMRestoreStatus(phase=RestorePhase.FAILED))]) is None


# --- Migration ----------------------------------------------------------------------------


def test_snapshots_block_migration() -> None:
    ready = SnapshotOnNode("nightly", SnapshotPhase.READY, NAME, has_xml=True)
    assert snapshots_block_migration([], shared_storage=False) is None
    failed = SnapshotOnNode("bad", SnapshotPhase.FAILED)
    assert snapshots_block_migration([failed], shared_storage=False) is None
    local = snapshots_block_migration([ready], shared_storage=False)
    assert local is not None
    assert "nightly" in local
    assert "node-local" in local
    assert snapshots_block_migration([ready], shared_storage=True) is None
    taking = SnapshotOnNode("now", SnapshotPhase.IN_PROGRESS)
    assert "now" in (snapshots_block_migration([taking], shared_storage=True) or "")
    no_xml = SnapshotOnNode("old", SnapshotPhase.READY, NAME, has_xml=False)
    assert "old" in (snapshots_block_migration([no_xml], shared_storage=True) or "")
    assert "r1" in (
        snapshots_block_migration([], shared_storage=True, restore_in_progress="r1") or ""
    )
    plan = migration_snapshot_plan([ready, failed])
    assert plan.forget_on_source == plan.redefine_on_target == (NAME,)


class _Any(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    def __hash__(self) -> int:
        return 0


def _any() -> Any:
    return _Any()
