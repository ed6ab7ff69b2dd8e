"""What snapshot and restore decisions share: what the agent read, and common actions.

The decisions themselves are :mod:`virtfleet.reconcile.snapshot` (VMSnapshot) and
:mod:`virtfleet.reconcile.restore` (VMRestore); both read the same VM, domain and object
views, may adopt their object and redefine lost libvirt metadata, and fail the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from virtfleet.api.conditions import Condition, ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.snapshot import (
    SnapshotPhase,
    VMRestoreSpec,
    VMRestoreStatus,
    VMSnapshotSpec,
    VMSnapshotStatus,
)
from virtfleet.api.virtualmachine import RunStrategy
from virtfleet.reconcile.vm_model import Power

#: Prefix of libvirt snapshot names virtfleet makes (followed by the VMSnapshot's uid).
LIBVIRT_PREFIX = "vf-"
#: How soon to look again while waiting for something outside our control.
WAIT_SECONDS = 5.0


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
    #: Free text libvirt keeps with it (virtfleet's: :func:`virtfleet.reconcile.quiesce.describe`).
    description: str | None = None


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
    #: The token of a restore marker on the domain (see :mod:`virtfleet.reconcile.restore`).
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


# --- Actions both kinds return ------------------------------------------------------------


@dataclass(frozen=True)
class Adopt:
    """Metadata only: ownerReference to the VM (garbage collection), the node label and,
    for snapshots, this node's finalizer (so the libvirt snapshot is deleted with it)."""

    vm_name: str
    vm_uid: str
    finalizer: bool


@dataclass(frozen=True)
class RedefineSnapshot:
    """Re-create lost libvirt metadata of a snapshot whose data is in the disks."""

    name: str
    xml: str


def failed_conditions(
    conditions: list[Condition], generation: int, reason: str, message: str, now: datetime
) -> list[Condition]:
    """kstatus of an object that failed for good: not Ready, Stalled with the reason."""
    return kstatus_conditions(
        conditions,
        generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=None,
        stalled=(reason, message),
        now=rfc3339(now),
    )


__all__ = [
    "LIBVIRT_PREFIX",
    "WAIT_SECONDS",
    "Adopt",
    "DomainFacts",
    "LibvirtSnapshot",
    "RedefineSnapshot",
    "RestoreView",
    "SnapshotRef",
    "SnapshotView",
    "VmRef",
    "failed_conditions",
    "libvirt_snapshot_name",
]
