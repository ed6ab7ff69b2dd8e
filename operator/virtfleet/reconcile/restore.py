"""What a node agent should do about a VMRestore, decided without doing it.

Pure functions like :mod:`virtfleet.reconcile.snapshot`. Reverting twice would throw away
what the guest did in between, so a VMRestore reverts at most once, across agent restarts:

1. a marker holding the restore's uid is written into the domain's ``<metadata>``
   (:class:`MarkDomain`);
2. status records the commitment (phase ``InProgress``), with a compare-and-swap write
   that must succeed *before* anything else happens (``write_status_first``);
3. the revert runs. A revert replaces the domain definition with the snapshot's, which
   cannot contain the marker (it did not exist when the snapshot was taken), so
   **marker present ⇔ not reverted yet**;
4. the power state is settled (disks-only restores) and status says ``Succeeded``.

An agent killed anywhere in between reads ``InProgress`` on restart, waits until no
libvirt job is running on the domain (a revert it started may still be running in
libvirtd), then looks at the marker: still there → revert now (the first and only
time); gone and the snapshot is libvirt's current one → the revert happened, finish
the remaining steps; gone but another snapshot is current → it cannot be proven
either way, so the restore fails cleanly (``Interrupted``) without reverting again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from virtfleet.api.conditions import ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.snapshot import RestorePhase, SnapshotError, SnapshotPhase, VMRestoreStatus
from virtfleet.api.virtualmachine import RunStrategy
from virtfleet.reconcile.snapshot_types import (
    WAIT_SECONDS,
    Adopt,
    DomainFacts,
    RedefineSnapshot,
    RestoreView,
    SnapshotRef,
    VmRef,
    failed_conditions,
)
from virtfleet.reconcile.vm_model import EventNote

#: libvirt's state reason for a domain a revert just put where it is.
FROM_SNAPSHOT = "from-snapshot"


# --- Actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkDomain:
    token: str


@dataclass(frozen=True)
class Revert:
    name: str
    #: ``True`` resume running, ``False`` leave paused, ``None`` the snapshot's own state.
    running: bool | None


@dataclass(frozen=True)
class DestroyDomain:
    reason: str


@dataclass(frozen=True)
class StartDomain:
    reason: str


RestoreAction = Adopt | RedefineSnapshot | MarkDomain | Revert | DestroyDomain | StartDomain


@dataclass(frozen=True)
class RestoreDecision:
    actions: tuple[RestoreAction, ...]
    status: VMRestoreStatus
    events: tuple[EventNote, ...] = ()
    requeue_after: float | None = None
    write_status_first: bool = False
    #: ``status`` is a step the next pass (right away) replaces: not worth a write.
    transient: bool = False


# --- Decisions ----------------------------------------------------------------------------


def restore_order(restores: Sequence[RestoreView]) -> list[RestoreView]:
    """Oldest first (creation time, then name): the order restores of one VM are judged in."""
    return sorted(restores, key=lambda r: (r.created, r.name))


def active_restore(restores: Sequence[RestoreView]) -> RestoreView | None:
    """The restore of a VM that may act now: the one in progress, else the oldest pending.

    Every other unfinished restore of the VM is refused while this one runs (DESIGN: a
    VM is restored by one VMRestore at a time, never by two interleaved).
    """
    ordered = restore_order(restores)
    for restore in ordered:
        if restore.status.phase is RestorePhase.IN_PROGRESS:
            return restore
    for restore in ordered:
        if restore.status.phase in (None, RestorePhase.PENDING):
            return restore
    return None


def decide_restore(
    restore: RestoreView,
    *,
    vm: VmRef,
    snapshot: SnapshotRef | None,
    dom: DomainFacts,
    node: str,
    now: datetime,
    busy_with: str | None = None,
    migrations: Sequence[str] = (),
) -> RestoreDecision:
    """The next step for one VMRestore of ``vm``, a VM on ``node``.

    ``busy_with`` names another restore of the VM that holds it (see
    :func:`active_restore`); ``migrations`` names its active VMMigrations.
    """
    status = restore.status.model_copy(
        update={"observed_generation": restore.generation, "node_name": node}
    )
    phase = restore.status.phase
    if phase in (RestorePhase.SUCCEEDED, RestorePhase.FAILED):
        return RestoreDecision((), status)
    actions: list[RestoreAction] = []
    if not restore.adopted:
        actions.append(Adopt(vm.name, vm.uid, finalizer=False))
    if phase is RestorePhase.IN_PROGRESS:
        return _restore_in_progress(restore, status, vm, snapshot, dom, actions, now)

    refusal = _refusal(restore, vm, snapshot, busy_with, migrations)
    if refusal is not None:
        return _restore_failed(restore, status, *refusal, now, actions=actions)
    assert snapshot is not None
    assert snapshot.libvirt_name is not None
    if not dom.defined:
        status = restore_conditions(
            status.model_copy(update={"phase": RestorePhase.PENDING}),
            restore.generation,
            "WaitingForDomain",
            "the VM's domain is not defined on the node yet",
            now,
        )
        return RestoreDecision(tuple(actions), status, requeue_after=WAIT_SECONDS)
    if dom.snapshot is None:
        if snapshot.snapshot_xml:
            actions.append(RedefineSnapshot(snapshot.libvirt_name, snapshot.snapshot_xml))
            return RestoreDecision(tuple(actions), status, requeue_after=0.0)
        return _restore_failed(
            restore,
            status,
            "SnapshotLost",
            f"libvirt snapshot {snapshot.libvirt_name} is gone from the node",
            now,
            actions=actions,
        )
    if dom.restore_marker != restore.uid:
        actions.append(MarkDomain(restore.uid))
        status = restore_conditions(
            status.model_copy(update={"phase": RestorePhase.PENDING}),
            restore.generation,
            "Preparing",
            "marking the domain before the revert",
            now,
        )
        return RestoreDecision(tuple(actions), status, requeue_after=0.0, transient=True)

    memory = snapshot.memory_included and vm.run_strategy is not RunStrategy.HALTED
    status = status.model_copy(
        update={
            "phase": RestorePhase.IN_PROGRESS,
            "complete": False,
            "start_time": rfc3339(now),
            "vm_uid": vm.uid,
            "snapshot_name": snapshot.libvirt_name,
            "memory_restored": memory,
            "error": None,
        }
    )
    status = restore_conditions(
        status, restore.generation, "Reverting", f"reverting to {snapshot.name}", now
    )
    return RestoreDecision(
        (*actions, _revert(snapshot.libvirt_name, memory, dom)), status, write_status_first=True
    )


def _revert(name: str, memory: bool, dom: DomainFacts) -> Revert:
    if memory:
        return Revert(name, running=True)
    has_memory = dom.snapshot is not None and dom.snapshot.has_memory
    # Disks only from a snapshot that holds memory: land paused, then power off (settle).
    return Revert(name, running=False if has_memory else None)


def _refusal(
    restore: RestoreView,
    vm: VmRef,
    snapshot: SnapshotRef | None,
    busy_with: str | None,
    migrations: Sequence[str],
) -> tuple[str, str] | None:
    if restore.spec is None:
        return "InvalidSpec", restore.invalid or "invalid spec"
    if vm.deleting:
        return "VMDeleting", f"VirtualMachine {vm.name} is being deleted"
    if busy_with is not None:
        return (
            "RestoreInProgress",
            f"VMRestore {busy_with} of VirtualMachine {vm.name} is in progress; "
            "one restore at a time",
        )
    if migrations:
        return (
            "MigrationInProgress",
            f"VirtualMachine {vm.name} is being migrated ({', '.join(sorted(migrations))})",
        )
    wanted = restore.spec.snapshot_name
    if snapshot is None:
        return "SnapshotNotFound", f"VMSnapshot {wanted} does not exist"
    if snapshot.vm_name != vm.name or (snapshot.vm_uid is not None and snapshot.vm_uid != vm.uid):
        return (
            "SnapshotOfAnotherVM",
            f"VMSnapshot {wanted} was taken of another VirtualMachine "
            f"({snapshot.vm_name}{'' if snapshot.vm_name != vm.name else ', an earlier one'})",
        )
    if snapshot.deleting:
        return "SnapshotDeleting", f"VMSnapshot {wanted} is being deleted"
    if (
        snapshot.phase is not SnapshotPhase.READY
        or not snapshot.ready_to_use
        or not snapshot.libvirt_name
    ):
        phase = snapshot.phase.value if snapshot.phase else "Pending"
        return "SnapshotNotReady", f"VMSnapshot {wanted} is not ready to use (phase {phase})"
    return None


def _restore_in_progress(
    restore: RestoreView,
    status: VMRestoreStatus,
    vm: VmRef,
    snapshot: SnapshotRef | None,
    dom: DomainFacts,
    actions: list[RestoreAction],
    now: datetime,
) -> RestoreDecision:
    name = status.snapshot_name or ""
    if not dom.defined or (status.vm_uid is not None and status.vm_uid != vm.uid):
        return _restore_failed(
            restore, status, "DomainGone", "the VM's domain disappeared during the restore", now
        )
    if dom.restore_marker == restore.uid:
        # Committed, and the marker proves the revert has not happened: do it now, once.
        if dom.snapshot is None:
            xml = snapshot.snapshot_xml if snapshot is not None else None
            if xml:
                actions.append(RedefineSnapshot(name, xml))
                return RestoreDecision(tuple(actions), status, requeue_after=0.0)
            return _restore_failed(
                restore, status, "SnapshotLost", f"libvirt snapshot {name} is gone", now
            )
        actions.append(_revert(name, bool(status.memory_restored), dom))
        status = restore_conditions(
            status, restore.generation, "Reverting", "reverting after an interruption", now
        )
        return RestoreDecision(tuple(actions), status)
    if dom.current_snapshot != name:
        return _restore_failed(
            restore,
            status,
            "Interrupted",
            "the agent was interrupted and cannot tell whether the revert happened "
            f"(the domain's current snapshot is {dom.current_snapshot or 'none'}, not {name}); "
            "it was not reverted again. Create a new VMRestore to restore.",
            now,
        )
    # Reverted. Disks-only restores end with the run strategy's power state.
    if not status.memory_restored:
        if dom.active and dom.reason == FROM_SNAPSHOT:
            actions.append(DestroyDomain("disks-only restore: the guest boots from the disks"))
            return RestoreDecision(tuple(actions), status)
        if _wants_running(vm.run_strategy) and not dom.active:
            actions.append(StartDomain(f"runStrategy {vm.run_strategy.value}"))
            return RestoreDecision(tuple(actions), status)
    status = status.model_copy(
        update={"phase": RestorePhase.SUCCEEDED, "complete": True, "restore_time": rfc3339(now)}
    )
    how = "resumed at the snapshot's moment" if status.memory_restored else "disks reverted"
    message = f"restored from {restore.spec.snapshot_name if restore.spec else name}: {how}"
    status = status.model_copy(
        update={
            "conditions": kstatus_conditions(
                status.conditions,
                restore.generation,
                ready=(ConditionStatus.TRUE, "Restored", message),
                reconciling=None,
                stalled=None,
                now=rfc3339(now),
            )
        }
    )
    return RestoreDecision(tuple(actions), status, (EventNote("Normal", "Restored", message),))


def _wants_running(strategy: RunStrategy) -> bool:
    """After a disks-only restore the guest is off; these strategies would start it anyway.

    ``Manual`` and ``Once`` never start a stopped VM on their own, ``Halted`` keeps it off.
    """
    return strategy in (RunStrategy.ALWAYS, RunStrategy.RERUN_ON_FAILURE)


def _restore_failed(
    restore: RestoreView,
    status: VMRestoreStatus,
    reason: str,
    message: str,
    now: datetime,
    *,
    actions: Sequence[RestoreAction] = (),
) -> RestoreDecision:
    status = status.model_copy(
        update={
            "phase": RestorePhase.FAILED,
            "complete": False,
            "error": SnapshotError(message=message, time=rfc3339(now)),
        }
    )
    status = status.model_copy(
        update={
            "conditions": failed_conditions(
                status.conditions, restore.generation, reason, message, now
            )
        }
    )
    return RestoreDecision(tuple(actions), status, (EventNote("Warning", reason, message),))


def restore_action_failed(
    restore: RestoreView, status: VMRestoreStatus, reason: str, message: str, now: datetime
) -> VMRestoreStatus:
    """Status after the revert failed in libvirt: the restore fails and is not retried."""
    return _restore_failed(restore, status, reason, message, now).status


def restore_conditions(
    status: VMRestoreStatus, generation: int, reason: str, message: str, now: datetime
) -> VMRestoreStatus:
    """kstatus of a restore under way (or waiting): not Ready, Reconciling with the step."""
    conditions = kstatus_conditions(
        status.conditions,
        generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=(reason, message),
        stalled=None,
        now=rfc3339(now),
    )
    return status.model_copy(update={"conditions": conditions})


__all__ = [
    "FROM_SNAPSHOT",
    "DestroyDomain",
    "MarkDomain",
    "RestoreAction",
    "RestoreDecision",
    "Revert",
    "StartDomain",
    "active_restore",
    "decide_restore",
    "restore_action_failed",
    "restore_conditions",
    "restore_order",
]
