"""What a node agent should do about VMSnapshots and VMRestores, decided without doing it.

Like :mod:`virtfleet.reconcile.vm`, these are pure functions of what the agent read (the
objects and the VM's domain); the agent runs the returned actions, observes again and
decides again until nothing is left to do, so a crash between any two actions is
harmless. Two things must happen *at most once* and get extra care:

* **Taking a snapshot.** The libvirt snapshot is named after the VMSnapshot's uid
  (:func:`libvirt_snapshot_name`): taking it again after a crash either finds it (done)
  or creates the one and only snapshot. Before it is taken, status records the intent
  (phase ``InProgress``, whether memory is included) so the decision does not change
  when the VM's power state does.

* **Reverting for a restore.** Reverting twice would throw away what the guest did in
  between, so a VMRestore reverts at most once, across agent restarts:

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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from virtfleet.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    remove_condition,
    rfc3339,
    set_condition,
)
from virtfleet.api.quantity import parse_duration
from virtfleet.api.snapshot import (
    DeletionPolicy,
    RestorePhase,
    SnapshotDiskStatus,
    SnapshotError,
    SnapshotPhase,
    VMRestoreSpec,
    VMRestoreStatus,
    VMSnapshotSpec,
    VMSnapshotStatus,
)
from virtfleet.api.virtualmachine import RunStrategy
from virtfleet.reconcile.vm import EventNote, Power

#: Prefix of libvirt snapshot names virtfleet makes (followed by the VMSnapshot's uid).
LIBVIRT_PREFIX = "vf-"
#: How soon to look again while waiting for something outside our control.
WAIT_SECONDS = 5.0
#: Phases of a VMMigration that are over; any other phase (or none yet) is active.
MIGRATION_DONE_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})
#: libvirt's state reason for a domain a revert just put where it is.
FROM_SNAPSHOT = "from-snapshot"


def libvirt_snapshot_name(snapshot_uid: str) -> str:
    """The libvirt snapshot of a VMSnapshot: unique, and the same after any restart."""
    return f"{LIBVIRT_PREFIX}{snapshot_uid}"


# --- What the agent read ------------------------------------------------------------------


@dataclass(frozen=True)
class VmRef:
    """The VirtualMachine a snapshot or restore names, as this node's agent holds it."""

    name: str
    uid: str
    run_strategy: RunStrategy
    deleting: bool = False


@dataclass(frozen=True)
class LibvirtSnapshot:
    """A libvirt snapshot of the domain (the hypervisor's SnapshotInfo, reduced)."""

    name: str
    state: str  # running, paused, shutoff, disk-snapshot
    has_memory: bool
    creation_time: int  # Unix seconds


@dataclass(frozen=True)
class DomainFacts:
    """The VM's domain, as far as snapshots and restores care."""

    defined: bool
    power: Power = Power.STOPPED
    #: libvirt's state reason (``from-snapshot``, ``booted``, ``destroyed``...).
    reason: str = ""
    #: The libvirt snapshot this object is about, when it exists.
    snapshot: LibvirtSnapshot | None = None
    #: Its XML (only read when status does not hold it yet).
    snapshot_xml: str | None = None
    #: The token of a restore marker on the domain (see the module doc).
    restore_marker: str | None = None
    #: libvirt's current snapshot (the last one taken or reverted to).
    current_snapshot: str | None = None
    #: Disks of the VM as (spec name, virtual size, allocation) at observation time.
    disks: tuple[tuple[str, int | None, int | None], ...] = ()

    @property
    def active(self) -> bool:
        return self.defined and self.power in (Power.RUNNING, Power.PAUSED, Power.STOPPING)


@dataclass(frozen=True)
class SnapshotView:
    namespace: str
    name: str
    uid: str
    generation: int
    created: datetime
    spec: VMSnapshotSpec | None
    status: VMSnapshotStatus
    deleting: bool = False
    #: ownerReference to the VM, the node label and this node's finalizer are in place.
    adopted: bool = False
    invalid: str | None = None


@dataclass(frozen=True)
class SnapshotRef:
    """The VMSnapshot a restore names, as the restore needs to judge it."""

    name: str
    vm_name: str
    vm_uid: str | None
    phase: SnapshotPhase | None
    ready_to_use: bool
    libvirt_name: str | None
    memory_included: bool
    snapshot_xml: str | None
    deleting: bool = False


@dataclass(frozen=True)
class RestoreView:
    namespace: str
    name: str
    uid: str
    generation: int
    created: datetime
    spec: VMRestoreSpec | None
    status: VMRestoreStatus
    adopted: bool = False
    invalid: str | None = None


# --- Actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adopt:
    """Metadata only: ownerReference to the VM (garbage collection), the node label and,
    for snapshots, this node's finalizer (so the libvirt snapshot is deleted with it)."""

    vm_name: str
    vm_uid: str
    finalizer: bool


@dataclass(frozen=True)
class TakeSnapshot:
    name: str
    #: libvirt must save memory (QEMU refuses internal snapshots of a running VM without).
    memory: bool
    quiesce: bool


@dataclass(frozen=True)
class RedefineSnapshot:
    """Re-create lost libvirt metadata of a snapshot whose data is in the disks."""

    name: str
    xml: str


@dataclass(frozen=True)
class DeleteSnapshot:
    name: str


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


SnapshotAction = Adopt | TakeSnapshot | RedefineSnapshot | DeleteSnapshot
RestoreAction = Adopt | RedefineSnapshot | MarkDomain | Revert | DestroyDomain | StartDomain


@dataclass(frozen=True)
class SnapshotDecision:
    actions: tuple[SnapshotAction, ...]
    status: VMSnapshotStatus
    events: tuple[EventNote, ...] = ()
    requeue_after: float | None = None
    #: Store ``status`` before running ``actions`` (it records an intent); if the write
    #: fails, do nothing.
    write_status_first: bool = False
    #: Deletion is complete: the node's finalizer may go.
    finalized: bool = False
    #: ``status`` is a step the next pass (right away) replaces: not worth a write.
    transient: bool = False


@dataclass(frozen=True)
class RestoreDecision:
    actions: tuple[RestoreAction, ...]
    status: VMRestoreStatus
    events: tuple[EventNote, ...] = ()
    requeue_after: float | None = None
    write_status_first: bool = False
    #: ``status`` is a step the next pass (right away) replaces: not worth a write.
    transient: bool = False


# --- VMSnapshot ---------------------------------------------------------------------------


def decide_snapshot(
    snap: SnapshotView,
    vm: VmRef | None,
    dom: DomainFacts,
    node: str,
    now: datetime,
    *,
    blocked_by: str | None = None,
) -> SnapshotDecision:
    """The next step for one VMSnapshot whose VM lives on ``node`` (or that is deleted).

    ``blocked_by`` says why the VM cannot be snapshotted right now (a restore or a
    migration of it is in progress): the snapshot waits, it is not refused.
    """
    name = snap.status.snapshot_name or libvirt_snapshot_name(snap.uid)
    if snap.deleting:
        return _snapshot_deletion(snap, dom, name)
    status = snap.status.model_copy(
        update={"observed_generation": snap.generation, "snapshot_name": name, "node_name": node}
    )
    if snap.spec is None:
        return _snapshot_failed(snap, status, "InvalidSpec", snap.invalid or "invalid spec", now)
    if snap.status.phase is SnapshotPhase.FAILED:
        return SnapshotDecision((), status)
    if vm is None:
        return _snapshot_waiting(snap, status, "VMNotFound", "the VirtualMachine is gone", now)
    if status.vm_uid is not None and status.vm_uid != vm.uid:
        return _snapshot_failed(
            snap,
            status,
            "VMReplaced",
            f"VirtualMachine {vm.name} was deleted and created again since the snapshot was "
            "taken; its snapshots went with the old one",
            now,
        )
    status = status.model_copy(update={"vm_uid": vm.uid})
    actions: list[SnapshotAction] = []
    if not snap.adopted:
        actions.append(Adopt(vm.name, vm.uid, finalizer=True))

    if snap.status.phase is SnapshotPhase.READY:
        return _snapshot_ready_check(snap, status, dom, name, actions, now)

    if dom.snapshot is not None:
        return _snapshot_done(snap, status, dom, actions, now)
    if _deadline_passed(snap, now):
        deadline = snap.spec.failure_deadline
        return _snapshot_failed(
            snap, status, "DeadlineExceeded", f"not Ready within failureDeadline {deadline}", now
        )
    if vm.deleting:
        return _snapshot_failed(
            snap, status, "VMDeleting", f"VirtualMachine {vm.name} is being deleted", now
        )
    if not dom.defined:
        return _snapshot_waiting(
            snap, status, "WaitingForDomain", "the VM's domain is not defined on the node yet", now
        )
    if not snap.adopted:
        # Finalizer first: a snapshot taken before it could be orphaned by a quick delete.
        status = status.model_copy(update={"phase": SnapshotPhase.PENDING, "ready_to_use": False})
        status = _snapshot_conditions(status, snap.generation, "Pending", "adopting", now)
        return SnapshotDecision(tuple(actions), status, requeue_after=0.0, transient=True)
    if blocked_by is not None and snap.status.phase is not SnapshotPhase.IN_PROGRESS:
        return _snapshot_waiting(snap, status, "Waiting", blocked_by, now)

    running = dom.power in (Power.RUNNING, Power.PAUSED)
    if snap.status.phase is SnapshotPhase.IN_PROGRESS:
        # Intent recorded, but libvirt has no such snapshot: the agent died before libvirt
        # made it (or libvirt lost it). The name is unique, so taking it now is the only one.
        memory = bool(snap.status.memory_included) and running
        message = "taking the snapshot again after an interruption"
    else:
        wanted = snap.spec.include_memory
        memory = running if wanted is None else (wanted and running)
        message = "taking the snapshot" + (" with memory" if memory else " of the disks")
    status = status.model_copy(
        update={
            "phase": SnapshotPhase.IN_PROGRESS,
            "ready_to_use": False,
            "memory_included": memory,
            "error": None,
        }
    )
    status = _snapshot_conditions(status, snap.generation, "InProgress", message, now)
    return SnapshotDecision(
        (TakeSnapshot(name, memory=running, quiesce=snap.spec.quiesce and running),),
        status,
        write_status_first=True,
    )


def _snapshot_done(
    snap: SnapshotView,
    status: VMSnapshotStatus,
    dom: DomainFacts,
    actions: list[SnapshotAction],
    now: datetime,
) -> SnapshotDecision:
    assert dom.snapshot is not None
    info = dom.snapshot
    memory = bool(status.memory_included) and info.has_memory
    created = datetime.fromtimestamp(info.creation_time, UTC) if info.creation_time else now
    disks = [
        SnapshotDiskStatus(name=name, size_bytes=size, allocation_bytes=allocation)
        for name, size, allocation in dom.disks
    ]
    status = status.model_copy(
        update={
            "phase": SnapshotPhase.READY,
            "ready_to_use": True,
            "creation_time": rfc3339(created),
            "memory_included": memory,
            "domain_state": info.state,
            "disks": disks,
            "snapshot_xml": dom.snapshot_xml or status.snapshot_xml,
            "error": None,
        }
    )
    what = "disks and memory" if memory else "disks"
    status = _snapshot_conditions(status, snap.generation, "Ready", f"holds the VM's {what}", now)
    event = EventNote("Normal", "SnapshotTaken", f"libvirt snapshot {info.name} holds the {what}")
    return SnapshotDecision(tuple(actions), status, (event,))


def _snapshot_ready_check(
    snap: SnapshotView,
    status: VMSnapshotStatus,
    dom: DomainFacts,
    name: str,
    actions: list[SnapshotAction],
    now: datetime,
) -> SnapshotDecision:
    """A Ready snapshot stays usable: lost libvirt metadata is redefined from status."""
    if dom.snapshot is not None or not dom.defined:
        # Not defined: the VM loop is (re)creating the domain; look again later.
        status = _snapshot_conditions(status, snap.generation, "Ready", _ready_message(status), now)
        requeue = None if dom.defined else WAIT_SECONDS
        return SnapshotDecision(tuple(actions), status, requeue_after=requeue)
    if status.snapshot_xml:
        actions.append(RedefineSnapshot(name, status.snapshot_xml))
        event = EventNote(
            "Warning",
            "SnapshotRedefined",
            f"libvirt had lost the metadata of snapshot {name}; re-created it from status",
        )
        status = _snapshot_conditions(status, snap.generation, "Ready", _ready_message(status), now)
        return SnapshotDecision(tuple(actions), status, (event,))
    return _snapshot_failed(
        snap, status, "SnapshotLost", f"libvirt snapshot {name} is gone from the node", now
    )


def _ready_message(status: VMSnapshotStatus) -> str:
    return "holds the VM's disks and memory" if status.memory_included else "holds the VM's disks"


def _snapshot_deletion(snap: SnapshotView, dom: DomainFacts, name: str) -> SnapshotDecision:
    retain = snap.spec is not None and snap.spec.deletion_policy is DeletionPolicy.RETAIN
    actions: tuple[SnapshotAction, ...] = ()
    events: tuple[EventNote, ...] = ()
    if dom.snapshot is not None and not retain:
        actions = (DeleteSnapshot(name),)
    elif dom.snapshot is not None:
        events = (EventNote("Normal", "SnapshotRetained", f"deletionPolicy Retain keeps {name}"),)
    return SnapshotDecision(actions, snap.status, events, finalized=True)


def _snapshot_waiting(
    snap: SnapshotView, status: VMSnapshotStatus, reason: str, message: str, now: datetime
) -> SnapshotDecision:
    if snap.spec is not None and _deadline_passed(snap, now):
        deadline = snap.spec.failure_deadline
        return _snapshot_failed(
            snap,
            status,
            "DeadlineExceeded",
            f"not Ready within failureDeadline {deadline}: {message}",
            now,
        )
    status = status.model_copy(update={"phase": SnapshotPhase.PENDING, "ready_to_use": False})
    status = _snapshot_conditions(status, snap.generation, reason, message, now)
    return SnapshotDecision((), status, requeue_after=WAIT_SECONDS)


def _snapshot_failed(
    snap: SnapshotView, status: VMSnapshotStatus, reason: str, message: str, now: datetime
) -> SnapshotDecision:
    first = snap.status.phase is not SnapshotPhase.FAILED
    status = status.model_copy(
        update={
            "phase": SnapshotPhase.FAILED,
            "ready_to_use": False,
            "error": SnapshotError(message=message, time=rfc3339(now)) if first else status.error,
        }
    )
    status = status.model_copy(
        update={
            "conditions": _failed_conditions(
                status.conditions, snap.generation, reason, message, now
            )
        }
    )
    events = (EventNote("Warning", reason, message),) if first else ()
    return SnapshotDecision((), status, events)


def snapshot_action_failed(
    snap: SnapshotView, status: VMSnapshotStatus, reason: str, message: str, now: datetime
) -> VMSnapshotStatus:
    """Status after taking the snapshot failed in libvirt (retrying cannot help)."""
    return _snapshot_failed(snap, status, reason, message, now).status


def _snapshot_conditions(
    status: VMSnapshotStatus, generation: int, reason: str, message: str, now: datetime
) -> VMSnapshotStatus:
    ready = status.phase is SnapshotPhase.READY
    conditions = _kstatus(
        status.conditions,
        generation,
        ready=(ConditionStatus.TRUE if ready else ConditionStatus.FALSE, reason, message),
        reconciling=None if ready else (reason, message),
        stalled=None,
        now=now,
    )
    return status.model_copy(update={"conditions": conditions})


def _deadline_passed(snap: SnapshotView, now: datetime) -> bool:
    if snap.spec is None or snap.spec.failure_deadline is None:
        return False
    limit = timedelta(seconds=parse_duration(str(snap.spec.failure_deadline)))
    return now - snap.created > limit


# --- Unclaimed: no agent looks at it yet ------------------------------------------------


class VmPresence(StrEnum):
    """Where the VM a VMSnapshot/VMRestore names is, as the controller sees the fleet."""

    MISSING = "Missing"  # no such VM (not yet, as in a Git sync, or not any more)
    UNPLACED = "Unplaced"  # exists, but no node yet: no agent watches it
    PLACED = "Placed"  # its node's agent owns the object from here on


def _waiting_for(vm_name: str, presence: VmPresence) -> tuple[str, str]:
    if presence is VmPresence.MISSING:
        return "VMNotFound", f"VirtualMachine {vm_name} does not exist; waiting for it"
    return "WaitingForPlacement", f"VirtualMachine {vm_name} is not placed on a node yet"


def unclaimed_snapshot_status(
    snap: SnapshotView, presence: VmPresence, now: datetime
) -> VMSnapshotStatus | None:
    """What the controller says of a VMSnapshot no agent handles; ``None``: not its business.

    Only agents act on snapshots, and only on those of the VMs placed on their node. A
    snapshot of a VM that does not exist (yet) or has no node would otherwise have no
    status at all: it says why it waits, and fails at its ``failureDeadline``.
    """
    if presence is VmPresence.PLACED or snap.deleting or snap.spec is None:
        return None
    if snap.status.phase not in (None, SnapshotPhase.PENDING):
        return None  # an agent took it (or it already ended): the agent's word stands
    reason, message = _waiting_for(snap.spec.vm_name, presence)
    status = snap.status.model_copy(update={"observed_generation": snap.generation})
    return _snapshot_waiting(snap, status, reason, message, now).status


def unclaimed_restore_status(
    restore: RestoreView, presence: VmPresence, now: datetime
) -> VMRestoreStatus | None:
    """The same for a VMRestore: it waits, visibly, for its VM to exist and be placed."""
    if presence is VmPresence.PLACED or restore.spec is None:
        return None
    if restore.status.phase not in (None, RestorePhase.PENDING):
        return None
    reason, message = _waiting_for(restore.spec.vm_name, presence)
    status = restore.status.model_copy(
        update={"observed_generation": restore.generation, "phase": RestorePhase.PENDING}
    )
    return _restore_conditions(status, restore.generation, reason, message, now)


# --- VMRestore ----------------------------------------------------------------------------


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
        status = _restore_conditions(
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
        status = _restore_conditions(
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
    status = _restore_conditions(
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
        status = _restore_conditions(
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
            "conditions": _kstatus(
                status.conditions,
                restore.generation,
                ready=(ConditionStatus.TRUE, "Restored", message),
                reconciling=None,
                stalled=None,
                now=now,
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
            "conditions": _failed_conditions(
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


def _restore_conditions(
    status: VMRestoreStatus, generation: int, reason: str, message: str, now: datetime
) -> VMRestoreStatus:
    conditions = _kstatus(
        status.conditions,
        generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=(reason, message),
        stalled=None,
        now=now,
    )
    return status.model_copy(update={"conditions": conditions})


# --- Migration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotOnNode:
    """A VMSnapshot of the VM being migrated, for :func:`snapshots_block_migration`."""

    name: str
    phase: SnapshotPhase | None
    libvirt_name: str | None = None
    has_xml: bool = False


@dataclass(frozen=True)
class MigrationSnapshotPlan:
    """What migration code does with a VM's snapshots when they do not block it."""

    #: libvirt snapshots to forget (metadata only) on the source before migrating...
    forget_on_source: tuple[str, ...] = ()
    #: ...and to redefine on the target from VMSnapshot status afterwards.
    redefine_on_target: tuple[str, ...] = field(default=())


def snapshots_block_migration(
    snapshots: Sequence[SnapshotOnNode],
    *,
    shared_storage: bool,
    restore_in_progress: str | None = None,
) -> str | None:
    """Why a VM with these snapshots cannot migrate now, or ``None`` when it can.

    libvirt refuses to migrate a domain that has snapshot metadata (DESIGN §5), and a
    storage copy (``--copy-storage-all``) copies the disks' current state only: internal
    snapshots stay behind in the source's qcow2 files. So:

    * a snapshot or restore in progress blocks (wait for it);
    * with every disk in a pool both nodes share, the snapshots live in the disks the
      target opens: forget the metadata on the source, migrate, redefine it on the target
      from ``status.snapshotXML`` (:func:`migration_snapshot_plan`); a snapshot without
      stored XML blocks, because it could not be brought back;
    * with node-local disks the snapshots would be lost: refuse, naming them, so the
      user deletes them (or keeps the VM where it is). Never lose them silently.
    """
    if restore_in_progress is not None:
        return f"VMRestore {restore_in_progress} is in progress"
    busy = sorted(
        s.name
        for s in snapshots
        if s.phase in (None, SnapshotPhase.PENDING, SnapshotPhase.IN_PROGRESS)
    )
    if busy:
        return f"snapshots are being taken: {', '.join(busy)}"
    kept = sorted(s.name for s in snapshots if s.phase is SnapshotPhase.READY)
    if not kept:
        return None
    if not shared_storage:
        return (
            f"the VM has {len(kept)} snapshot(s) inside its node-local disks "
            f"({', '.join(kept)}); a storage copy does not carry internal snapshots, so "
            "migrating would lose them: delete them first"
        )
    missing = sorted(s.name for s in snapshots if s.phase is SnapshotPhase.READY and not s.has_xml)
    if missing:
        return (
            f"snapshot metadata of {', '.join(missing)} is not recorded in status, so it "
            "could not be redefined on the target"
        )
    return None


def migration_snapshot_plan(snapshots: Sequence[SnapshotOnNode]) -> MigrationSnapshotPlan:
    """The metadata moves for a migration :func:`snapshots_block_migration` allowed."""
    names = tuple(
        s.libvirt_name for s in snapshots if s.phase is SnapshotPhase.READY and s.libvirt_name
    )
    return MigrationSnapshotPlan(forget_on_source=names, redefine_on_target=names)


# --- Shared pieces ------------------------------------------------------------------------


def _kstatus(
    conditions: list[Condition],
    generation: int,
    *,
    ready: tuple[ConditionStatus, str, str],
    reconciling: tuple[str, str] | None,
    stalled: tuple[str, str] | None,
    now: datetime,
) -> list[Condition]:
    when = rfc3339(now)
    out = set_condition(
        conditions,
        type=ConditionType.READY,
        status=ready[0],
        reason=ready[1],
        message=ready[2],
        observed_generation=generation,
        now=when,
    )
    for kind, value in ((ConditionType.RECONCILING, reconciling), (ConditionType.STALLED, stalled)):
        if value is None:
            out = remove_condition(out, kind)  # kstatus: absent unless true
        else:
            out = set_condition(
                out,
                type=kind,
                status=ConditionStatus.TRUE,
                reason=value[0],
                message=value[1],
                observed_generation=generation,
                now=when,
            )
    return out


def _failed_conditions(
    conditions: list[Condition], generation: int, reason: str, message: str, now: datetime
) -> list[Condition]:
    return _kstatus(
        conditions,
        generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=None,
        stalled=(reason, message),
        now=now,
    )


__all__ = [
    "LIBVIRT_PREFIX",
    "MIGRATION_DONE_PHASES",
    "Adopt",
    "DeleteSnapshot",
    "DestroyDomain",
    "DomainFacts",
    "LibvirtSnapshot",
    "MarkDomain",
    "MigrationSnapshotPlan",
    "RedefineSnapshot",
    "RestoreAction",
    "RestoreDecision",
    "RestoreView",
    "Revert",
    "SnapshotAction",
    "SnapshotDecision",
    "SnapshotOnNode",
    "SnapshotRef",
    "SnapshotView",
    "StartDomain",
    "TakeSnapshot",
    "VmRef",
    "active_restore",
    "decide_restore",
    "decide_snapshot",
    "libvirt_snapshot_name",
    "migration_snapshot_plan",
    "restore_action_failed",
    "restore_order",
    "snapshot_action_failed",
    "snapshots_block_migration",
]
