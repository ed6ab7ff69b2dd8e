"""Domain events as plain values.

libvirt delivers lifecycle events as ``(event, detail)`` integer pairs whose meaning of
``detail`` depends on ``event``. Upper layers only need them as *hints* to enqueue a
reconcile (events are lost while disconnected, so a resync after every reconnect is the
real source of truth), but readable names make logs and Kubernetes Events useful. The
tables are libvirt's stable ABI (``virDomainEventType`` and its ``*DetailType`` enums);
a unit test checks them against the binding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from virtfleet.domain.jobs import JobProgress

__all__ = ["DomainEvent", "EventKind", "lifecycle_event"]


class EventKind(enum.StrEnum):
    """What happened to a domain: libvirt's lifecycle events plus reboot/job-completed."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"
    REBOOT = "reboot"
    JOB_COMPLETED = "job-completed"
    UNKNOWN = "unknown"


# virDomainEventType, in order.
_LIFECYCLE: tuple[EventKind, ...] = (
    EventKind.DEFINED,
    EventKind.UNDEFINED,
    EventKind.STARTED,
    EventKind.SUSPENDED,
    EventKind.RESUMED,
    EventKind.STOPPED,
    EventKind.SHUTDOWN,
    EventKind.PMSUSPENDED,
    EventKind.CRASHED,
)

# virDomainEvent<Kind>DetailType, in order.
_DETAILS: dict[EventKind, tuple[str, ...]] = {
    EventKind.DEFINED: ("added", "updated", "renamed", "from-snapshot"),
    EventKind.UNDEFINED: ("removed", "renamed"),
    EventKind.STARTED: (
        "booted",
        "migrated",
        "restored",
        "from-snapshot",
        "wakeup",
        "recreated",
    ),
    EventKind.SUSPENDED: (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from-snapshot",
        "api-error",
        "postcopy",
        "postcopy-failed",
    ),
    EventKind.RESUMED: ("unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"),
    EventKind.STOPPED: (
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from-snapshot",
        "recreated",
    ),
    EventKind.SHUTDOWN: ("finished", "guest", "host"),
    EventKind.PMSUSPENDED: ("memory", "disk"),
    EventKind.CRASHED: ("panicked", "crashloaded"),
}


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """One event about one domain, as delivered to asyncio subscribers.

    ``detail`` is a readable name (``"destroyed"``), ``detail_code`` libvirt's number;
    ``job`` is set for :attr:`EventKind.JOB_COMPLETED` only.
    """

    uuid: str
    name: str
    event: EventKind
    detail: str = ""
    detail_code: int = 0
    job: JobProgress | None = None


def lifecycle_event(uuid: str, name: str, event: int, detail: int) -> DomainEvent:
    """Decode a lifecycle callback's integers; unknown numbers (newer libvirt) stay visible."""
    kind = _LIFECYCLE[event] if 0 <= event < len(_LIFECYCLE) else EventKind.UNKNOWN
    names = _DETAILS.get(kind, ())
    detail_name = names[detail] if 0 <= detail < len(names) else f"unknown-{detail}"
    return DomainEvent(uuid=uuid, name=name, event=kind, detail=detail_name, detail_code=detail)
