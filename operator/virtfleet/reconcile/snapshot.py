"""What a node agent should do about a VMSnapshot, decided without doing it.

Like :mod:`virtfleet.reconcile.vm`, these are pure functions of what the agent read (the
objects and the VM's domain); the agent runs the returned actions, observes again and
decides again until nothing is left to do, so a crash between any two actions is
harmless. Taking a snapshot must happen *at most once*: the libvirt snapshot is named
after the VMSnapshot's uid (:func:`~virtfleet.reconcile.snapshot_types.libvirt_snapshot_name`):
taking it again after a crash either finds it (done) or creates the one and only
snapshot. Before it is taken, status records the intent (phase ``InProgress``, whether
memory is included) so the decision does not change when the VM's power state does.
Restores are :mod:`virtfleet.reconcile.restore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from virtfleet.api.conditions import ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.quantity import parse_duration
from virtfleet.api.snapshot import (
    DeletionPolicy,
    SnapshotDiskStatus,
    SnapshotError,
    SnapshotPhase,
    VMSnapshotStatus,
)
from virtfleet.reconcile.quiesce import QuiesceOutcome, indications, read_outcome
from virtfleet.reconcile.snapshot_types import (
    WAIT_SECONDS,
    Adopt,
    DomainFacts,
    RedefineSnapshot,
    SnapshotView,
    VmRef,
    failed_conditions,
    libvirt_snapshot_name,
)
from virtfleet.reconcile.vm_model import EventNote, Power

# --- Actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TakeSnapshot:
    name: str
    #: libvirt must save memory (QEMU refuses internal snapshots of a running VM without).
    memory: bool
    quiesce: bool


@dataclass(frozen=True)
class DeleteSnapshot:
    name: str


@dataclass(frozen=True)
class ThawFilesystems:
    """Thaw the guest after a quiesced snapshot (again: the agent may have died between
    its freeze and its thaw, and a frozen guest hangs every write). Best effort."""


SnapshotAction = Adopt | TakeSnapshot | RedefineSnapshot | DeleteSnapshot | ThawFilesystems


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


# --- Decisions ----------------------------------------------------------------------------


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
        return snapshot_waiting(snap, status, "VMNotFound", "the VirtualMachine is gone", now)
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
        return snapshot_waiting(
            snap, status, "WaitingForDomain", "the VM's domain is not defined on the node yet", now
        )
    if not snap.adopted:
        # Finalizer first: a snapshot taken before it could be orphaned by a quick delete.
        status = status.model_copy(update={"phase": SnapshotPhase.PENDING, "ready_to_use": False})
        status = _snapshot_conditions(status, snap.generation, "Pending", "adopting", now)
        return SnapshotDecision(tuple(actions), status, requeue_after=0.0, transient=True)
    if blocked_by is not None and snap.status.phase is not SnapshotPhase.IN_PROGRESS:
        return snapshot_waiting(snap, status, "Waiting", blocked_by, now)

    running = dom.power in (Power.RUNNING, Power.PAUSED)
    # libvirt asks a paused guest's agent nothing: only a running guest can freeze.
    quiesce = snap.spec.quiesce and dom.power is Power.RUNNING
    if snap.status.phase is SnapshotPhase.IN_PROGRESS:
        # Intent recorded, but libvirt has no such snapshot: the agent died before libvirt
        # made it (or libvirt lost it). The name is unique, so taking it now is the only one.
        memory = bool(snap.status.memory_included) and running
        message = "taking the snapshot again after an interruption"
    else:
        wanted = snap.spec.include_memory
        # Quiesce means disks-only (CEL refuses both); unset memory follows it.
        memory = (running and not snap.spec.quiesce) if wanted is None else (wanted and running)
        message = "taking the snapshot" + (" with memory" if memory else " of the disks")
        if quiesce:
            message += ", filesystems frozen"
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
        (TakeSnapshot(name, memory=running, quiesce=quiesce),),
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
    outcome, quiesce_error = read_outcome(info.description)
    online = info.state in ("running", "paused")
    events: list[EventNote] = []
    if outcome is QuiesceOutcome.NO_GUEST_AGENT:
        events.append(
            EventNote(
                "Warning",
                "NoGuestAgent",
                "not quiesced: no guest agent was connected; the disks are crash-consistent",
            )
        )
    elif outcome is QuiesceOutcome.QUIESCE_FAILED:
        events.append(
            EventNote(
                "Warning",
                "QuiesceFailed",
                f"not quiesced: the guest agent could not freeze: {quiesce_error}; the disks "
                "are crash-consistent",
            )
        )
    if outcome is not None and outcome.froze and dom.power in (Power.RUNNING, Power.PAUSED):
        actions = [*actions, ThawFilesystems()]
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
            "quiesced": outcome is QuiesceOutcome.QUIESCED
            if snap.spec is not None and snap.spec.quiesce
            else None,
            "indications": indications(online=online, outcome=outcome),
            "snapshot_xml": dom.snapshot_xml or status.snapshot_xml,
            "error": None,
        }
    )
    what = "disks and memory" if memory else "disks"
    if outcome is QuiesceOutcome.QUIESCED:
        what += " (quiesced)"
    status = _snapshot_conditions(status, snap.generation, "Ready", f"holds the VM's {what}", now)
    event = EventNote("Normal", "SnapshotTaken", f"libvirt snapshot {info.name} holds the {what}")
    return SnapshotDecision(tuple(actions), status, (event, *events))


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


def snapshot_waiting(
    snap: SnapshotView, status: VMSnapshotStatus, reason: str, message: str, now: datetime
) -> SnapshotDecision:
    """Pending, saying why; failed once ``failureDeadline`` passed (waiting is not forever)."""
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
            "conditions": failed_conditions(
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
    conditions = kstatus_conditions(
        status.conditions,
        generation,
        ready=(ConditionStatus.TRUE if ready else ConditionStatus.FALSE, reason, message),
        reconciling=None if ready else (reason, message),
        stalled=None,
        now=rfc3339(now),
    )
    return status.model_copy(update={"conditions": conditions})


def _deadline_passed(snap: SnapshotView, now: datetime) -> bool:
    if snap.spec is None or snap.spec.failure_deadline is None:
        return False
    limit = timedelta(seconds=parse_duration(str(snap.spec.failure_deadline)))
    return now - snap.created > limit


__all__ = [
    "DeleteSnapshot",
    "SnapshotAction",
    "SnapshotDecision",
    "TakeSnapshot",
    "ThawFilesystems",
    "decide_snapshot",
    "snapshot_action_failed",
    "snapshot_waiting",
]
