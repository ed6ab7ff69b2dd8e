"""Hypervisor adapter: the only package that talks to libvirt.

It takes domain XML strings and plain values and returns small frozen dataclasses; it
never imports the API models or the domain-XML builder, and upper layers never import
``libvirt`` (errors arrive as :mod:`virtfleet.hypervisor.errors`).

Modules: :mod:`.connection` (the long-lived connection, events, reconnect),
:mod:`.guest` (one domain), :mod:`.storage` (pools and volumes), :mod:`.snapshots`,
:mod:`.events`, :mod:`.errors`, :mod:`.executor`, :mod:`.eventloop`, :mod:`.names`. Job
progress parsing is :mod:`virtfleet.domain.jobs` (pure; the reconcile layer reads it too).
"""

from virtfleet.domain.jobs import JobOperation, JobProgress, JobType
from virtfleet.hypervisor.connection import Hypervisor
from virtfleet.hypervisor.errors import (
    AlreadyExists,
    ConnectionLost,
    HypervisorError,
    InvalidDefinition,
    InvalidName,
    NotFound,
    OperationInvalid,
    UnsafeImage,
    Unsupported,
)
from virtfleet.hypervisor.events import DomainEvent, EventKind
from virtfleet.hypervisor.guest import (
    Guest,
    GuestState,
    GuestStatus,
    OwnedGuest,
    StopOutcome,
    StopPath,
)
from virtfleet.hypervisor.hostinfo import HostFacts
from virtfleet.hypervisor.settings import HypervisorSettings
from virtfleet.hypervisor.snapshots import SnapshotInfo
from virtfleet.hypervisor.storage import PoolInfo, Volume, VolumeRef

__all__ = [
    "AlreadyExists",
    "ConnectionLost",
    "DomainEvent",
    "EventKind",
    "Guest",
    "GuestState",
    "GuestStatus",
    "HostFacts",
    "Hypervisor",
    "HypervisorError",
    "HypervisorSettings",
    "InvalidDefinition",
    "InvalidName",
    "JobOperation",
    "JobProgress",
    "JobType",
    "NotFound",
    "OperationInvalid",
    "OwnedGuest",
    "PoolInfo",
    "SnapshotInfo",
    "StopOutcome",
    "StopPath",
    "UnsafeImage",
    "Unsupported",
    "Volume",
    "VolumeRef",
]
