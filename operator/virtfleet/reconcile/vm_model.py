"""The values :func:`virtfleet.reconcile.vm.decide` reads and returns.

In: the VirtualMachine as the agent read it (:class:`VmView`) and its domain reduced to
what the decisions need (:class:`Observed`). Out: a :class:`Decision` — the actions to
run in order, the status, and the Events that report them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from virtfleet.api.virtualmachine import (
    ConsoleEndpoint,
    VirtualMachineSpec,
    VirtualMachineStatus,
)
from virtfleet.domain.guestagent import GuestAgentReport
from virtfleet.identity import POWER_ACTIONS


class Power(StrEnum):
    """The domain's power state, as far as the run strategy cares."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"  # a shutdown is in progress
    STOPPED = "stopped"
    CRASHED = "crashed"


class StopCause(StrEnum):
    """Why a stopped domain stopped (libvirt's shutoff reason, simplified)."""

    NONE = "none"  # never ran, or nothing known
    GUEST = "guest"  # the guest powered off (or an ACPI shutdown completed)
    DESTROYED = "destroyed"  # killed from outside (virsh destroy)
    CRASHED = "crashed"  # QEMU or the guest crashed
    FAILED = "failed"  # QEMU failed to start or died
    MIGRATED = "migrated"
    SAVED = "saved"
    SNAPSHOT = "snapshot"  # stopped by reverting to a disk-only snapshot

    @property
    def is_failure(self) -> bool:
        return self in (StopCause.DESTROYED, StopCause.CRASHED, StopCause.FAILED)


@dataclass(frozen=True)
class VmView:
    """The VirtualMachine as the agent read it."""

    namespace: str
    name: str
    uid: str
    generation: int
    node: str
    spec: VirtualMachineSpec | None
    status: VirtualMachineStatus
    deleting: bool = False
    #: Why ``spec`` could not be used (validation failed in this agent); None when fine.
    invalid: str | None = None
    #: An imperative power request not yet handled (from the power-request annotation).
    power_request: PowerRequest | None = None
    #: Why the VM must not start now (its disks are being replaced by a restore); None: free.
    start_held: str | None = None
    #: NIC name → its address on its VMNetwork (the controller's IPAM record).
    addresses: Mapping[str, str] = field(default_factory=dict)
    #: The guest agent's last answer while the domain runs (None: not asked yet).
    guest: GuestAgentReport | None = None
    #: This node's console endpoint for the VM (None: the agent serves no console).
    console: ConsoleEndpoint | None = None


@dataclass(frozen=True)
class PowerRequest:
    action: str  # start | stop | restart | pause | unpause
    id: str

    @classmethod
    def parse(cls, value: str | None) -> PowerRequest | None:
        """``"<action>/<id>"``; anything else is ignored (it is not ours to refuse)."""
        if not value or "/" not in value:
            return None
        action, _, request_id = value.partition("/")
        return cls(action, request_id) if action in POWER_ACTIONS and request_id else None


@dataclass(frozen=True)
class Observed:
    """The VM's domain on this node, reduced to what the decisions need."""

    defined: bool
    #: False for a running domain whose definition was removed (it vanishes when it stops).
    persistent: bool = True
    power: Power = Power.STOPPED
    stop_cause: StopCause = StopCause.NONE
    #: Paths where the persistent definition differs from what the spec renders to.
    drift: tuple[str, ...] = ()
    #: Whether the owner marker records this generation (else: redefine, quietly).
    marker_current: bool = True
    #: Paths libvirt can change on the running domain (iotune, bandwidth) that differ.
    live_changes: tuple[str, ...] = ()
    #: Paths that differ between the running domain and the spec and need a reboot.
    restart_changes: tuple[str, ...] = ()
    #: Disk names whose volume (or the cloud-init seed, as ``cloudInit``) is missing.
    missing_volumes: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.defined and self.power in (Power.RUNNING, Power.PAUSED, Power.STOPPING)


# --- Actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsureVolumes:
    """Create the disks (overlay, blank, download) and cloud-init seed that are missing."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Define:
    """(Re)define the domain from the spec; the running guest keeps its current config."""

    reason: str


@dataclass(frozen=True)
class ApplyLive:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Start:
    reason: str


@dataclass(frozen=True)
class Stop:
    """ACPI shutdown, destroy after ``grace_seconds`` (DESIGN §1)."""

    grace_seconds: int
    reason: str


@dataclass(frozen=True)
class Undefine:
    pass


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class DeleteVolumes:
    pass


Action = (
    EnsureVolumes | Define | ApplyLive | Start | Stop | Undefine | DeleteVolumes | Pause | Resume
)


@dataclass(frozen=True)
class EventNote:
    """An Event for ``kubectl describe``: something a user should see."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    status: VirtualMachineStatus
    events: tuple[EventNote, ...] = ()
    #: Look again after this many seconds even without a change (back-off, polling).
    requeue_after: float | None = None
    #: Everything is cleaned up: the node's finalizer may go.
    finalized: bool = False


def warning(reason: str, message: str) -> EventNote:
    """A Warning Event: something went wrong or was repaired behind virtfleet's back."""
    return EventNote("Warning", reason, message)
