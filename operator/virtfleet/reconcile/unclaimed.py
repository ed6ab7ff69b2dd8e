"""The controller's word on VMSnapshots and VMRestores no agent handles yet: pure functions.

Their VM is missing or has no node, so no agent looks at them; the controller's loop
(:mod:`virtfleet.controller.unclaimed`) writes what these decide.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from virtfleet.api.snapshot import RestorePhase, SnapshotPhase, VMRestoreStatus, VMSnapshotStatus
from virtfleet.reconcile.restore import restore_conditions
from virtfleet.reconcile.snapshot import snapshot_waiting
from virtfleet.reconcile.snapshot_types import RestoreView, SnapshotView


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
    return snapshot_waiting(snap, status, reason, message, now).status


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
    return restore_conditions(status, restore.generation, reason, message, now)


__all__ = ["VmPresence", "unclaimed_restore_status", "unclaimed_snapshot_status"]
