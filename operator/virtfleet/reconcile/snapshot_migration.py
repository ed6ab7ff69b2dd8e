"""How a VM's snapshots and restores constrain its migration: pure rules, no I/O.

The migration loops ask :func:`snapshots_block_migration` whether the VM's snapshots let
it go, and :func:`migration_snapshot_plan` which libvirt snapshot metadata to carry over.
A VMRestore is refused while a migration of its VM is not over
(:data:`MIGRATION_DONE_PHASES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from virtfleet.api.snapshot import SnapshotPhase

#: Phases of a VMMigration that are over; any other phase (or none yet) is active.
MIGRATION_DONE_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})


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


__all__ = [
    "MIGRATION_DONE_PHASES",
    "MigrationSnapshotPlan",
    "SnapshotOnNode",
    "migration_snapshot_plan",
    "snapshots_block_migration",
]
