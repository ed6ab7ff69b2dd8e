"""Progress of a domain job (migration, snapshot, save) as a plain value.

Parsing only, a pure function over the dict libvirt returns (the style of OpenStack
Nova's ``libvirt/migration.py``). It lives below both ``hypervisor`` (which polls
``jobStats()``) and ``reconcile`` (which decides on the progress), so the pure layer
never imports the I/O one. No libvirt import here: the numbers are libvirt's stable ABI
(``virDomainJobType``, ``virDomainJobOperation``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["JobOperation", "JobProgress", "JobType", "parse_job_info", "parse_job_stats"]


class JobType(enum.IntEnum):
    """``virDomainJobType``. ``NONE`` while idle, and also right after a job ended."""

    NONE = 0
    BOUNDED = 1
    UNBOUNDED = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5


class JobOperation(enum.IntEnum):
    """``virDomainJobOperation``: which API started the job (libvirt >= 3.3)."""

    UNKNOWN = 0
    START = 1
    SAVE = 2
    RESTORE = 3
    MIGRATION_IN = 4
    MIGRATION_OUT = 5
    SNAPSHOT = 6
    SNAPSHOT_REVERT = 7
    DUMP = 8
    BACKUP = 9
    SNAPSHOT_DELETE = 10


@dataclass(frozen=True, slots=True)
class JobProgress:
    """A snapshot of one job's counters. Absent counters are 0 (libvirt omits what it lacks)."""

    type: JobType
    operation: JobOperation = JobOperation.UNKNOWN
    time_elapsed_ms: int = 0
    time_remaining_ms: int = 0
    data_total: int = 0
    data_processed: int = 0
    data_remaining: int = 0
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_bps: int = 0
    #: Pages dirtied per second (libvirt reports pages, not bytes).
    memory_dirty_rate: int = 0
    memory_page_size: int = 0
    memory_iteration: int = 0
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    #: Measured downtime of a finished migration, or the expected one while running.
    downtime_ms: int = 0
    auto_converge_throttle: int = 0
    error_message: str | None = None

    @property
    def active(self) -> bool:
        """The job is still running."""
        return self.type in (JobType.BOUNDED, JobType.UNBOUNDED)

    @property
    def percent(self) -> float | None:
        """Share of data processed, 0-100; ``None`` while the total is unknown."""
        if self.data_total <= 0:
            return None
        return max(0.0, min(100.0, 100.0 * self.data_processed / self.data_total))

    @property
    def dirty_rate_bytes_per_second(self) -> int | None:
        """Dirty rate in bytes/s, when libvirt reported the page size too."""
        if self.memory_page_size <= 0:
            return None
        return self.memory_dirty_rate * self.memory_page_size


_INT_FIELDS = {
    "time_elapsed": "time_elapsed_ms",
    "time_remaining": "time_remaining_ms",
    "data_total": "data_total",
    "data_processed": "data_processed",
    "data_remaining": "data_remaining",
    "memory_total": "memory_total",
    "memory_processed": "memory_processed",
    "memory_remaining": "memory_remaining",
    "memory_bps": "memory_bps",
    "memory_dirty_rate": "memory_dirty_rate",
    "memory_page_size": "memory_page_size",
    "memory_iteration": "memory_iteration",
    "disk_total": "disk_total",
    "disk_processed": "disk_processed",
    "disk_remaining": "disk_remaining",
    "downtime": "downtime_ms",
    "auto_converge_throttle": "auto_converge_throttle",
}


def _enum_or(cls: type[enum.IntEnum], value: Any, default: int) -> Any:
    try:
        return cls(int(value))
    except (TypeError, ValueError, OverflowError):
        return cls(default)


def _non_negative(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def parse_job_stats(stats: Mapping[str, Any], *, job_type: int | None = None) -> JobProgress:
    """Build a :class:`JobProgress` from ``virDomain.jobStats()`` (or a JOB_COMPLETED event).

    ``job_type`` overrides ``stats["type"]``; JOB_COMPLETED event parameters carry no type
    because the event itself says the job completed. Unknown keys are ignored and
    malformed values read as 0, so a newer libvirt cannot break the poller.
    """
    raw_type = job_type if job_type is not None else stats.get("type", JobType.NONE)
    values: dict[str, Any] = {
        field: _non_negative(stats[key]) for key, field in _INT_FIELDS.items() if key in stats
    }
    errmsg = stats.get("errmsg")
    return JobProgress(
        type=_enum_or(JobType, raw_type, JobType.NONE),
        operation=_enum_or(JobOperation, stats.get("operation", 0), JobOperation.UNKNOWN),
        error_message=str(errmsg) if errmsg else None,
        **values,
    )


def parse_job_info(info: Sequence[int]) -> JobProgress:
    """Build a :class:`JobProgress` from the legacy ``virDomain.jobInfo()`` list.

    Fallback for drivers without ``jobStats()``; the list is ``[type, elapsed, remaining,
    data_total, data_processed, data_remaining, mem_total, mem_processed, mem_remaining,
    file_total, file_processed, file_remaining]``.
    """
    padded = [*info, *([0] * (12 - len(info)))]
    return JobProgress(
        type=_enum_or(JobType, padded[0], JobType.NONE),
        time_elapsed_ms=_non_negative(padded[1]),
        time_remaining_ms=_non_negative(padded[2]),
        data_total=_non_negative(padded[3]),
        data_processed=_non_negative(padded[4]),
        data_remaining=_non_negative(padded[5]),
        memory_total=_non_negative(padded[6]),
        memory_processed=_non_negative(padded[7]),
        memory_remaining=_non_negative(padded[8]),
        disk_total=_non_negative(padded[9]),
        disk_processed=_non_negative(padded[10]),
        disk_remaining=_non_negative(padded[11]),
    )
