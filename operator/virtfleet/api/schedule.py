"""``VMBackupSchedule``: VMBackups on a cron schedule, pruned to a retention policy."""

from __future__ import annotations

from typing import Annotated

from croniter import croniter
from pydantic import AfterValidator, Field, StringConstraints

from virtfleet.api.backup import BackupMode
from virtfleet.api.base import ApiModel, CelRule, DnsLabel, DnsSubdomain, StatusModel
from virtfleet.api.conditions import Conditions
from virtfleet.api.quantity import Duration, parse_duration
from virtfleet.api.snapshot import DeletionPolicy

#: Five cron fields, a macro (@hourly, @daily, @weekly, @monthly, @yearly), or
#: ``@every <duration>`` (Velero's and robfig/cron's extension, e.g. ``@every 6h``).
SCHEDULE_PATTERN = (
    r"^(@(hourly|daily|weekly|monthly|yearly|annually|midnight)"
    r"|@every [0-9][0-9a-z.]*"
    r"|[0-9*,/?LW#A-Za-z-]+( [0-9*,/?LW#A-Za-z-]+){4})$"
)


def check_schedule(text: str) -> str:
    """What the pattern cannot tell: the fields parse, the interval is a duration."""
    if text.startswith("@every "):
        if parse_duration(text.removeprefix("@every ")) < 1:
            raise ValueError("@every needs an interval of at least 1s")
        return text
    if not croniter.is_valid(text):
        raise ValueError(f"{text!r} is not a cron schedule (five fields, e.g. '0 2 * * *')")
    return text


Schedule = Annotated[
    str,
    StringConstraints(pattern=SCHEDULE_PATTERN, max_length=256),
    AfterValidator(check_schedule),
]


class Retention(ApiModel):
    """Which Completed backups a schedule keeps (the union of the rules; at least one).

    A backup a kept incremental builds on is kept too, so every kept backup restores.
    """

    keep_last: int | None = Field(default=None, ge=1, le=10_000, description="The newest N.")
    keep_daily: int | None = Field(
        default=None, ge=1, le=10_000, description="The newest of each of the last N days."
    )
    keep_weekly: int | None = Field(
        default=None, ge=1, le=10_000, description="The newest of each of the last N weeks."
    )

    cel_rules = (
        CelRule(
            rule="has(self.keepLast) || has(self.keepDaily) || has(self.keepWeekly)",
            message="retention needs at least one of keepLast, keepDaily or keepWeekly",
            check=lambda r: any(v is not None for v in (r.keep_last, r.keep_daily, r.keep_weekly)),
        ),
    )


class VMBackupScheduleSpec(ApiModel):
    schedule: Schedule = Field(
        description="When: five cron fields in UTC ('0 2 * * *'), a macro (@daily) or "
        "'@every <duration>' ('@every 6h')."
    )
    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    location: DnsSubdomain = Field(description="VMBackupLocation in the same namespace.")
    mode: BackupMode = Field(
        default=BackupMode.AUTO, description="Mode of the backups it creates (default Auto)."
    )
    full_every: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Every Nth backup is full (default 7; 1: always full), so chains end "
        "and old ones can be pruned.",
    )
    retention: Retention | None = Field(
        default=None, description="What to keep (default keepLast 7)."
    )
    starting_deadline: Duration | None = Field(
        default=None,
        description="A run not started within this time of its moment is missed (default 5m).",
    )
    suspend: bool = Field(default=False, description="Create no backups while true.")
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.DELETE,
        description="deletionPolicy of the backups it creates (Delete: pruning deletes data).",
    )


class VMBackupScheduleStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    last_schedule_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="Last run's moment."
    )
    next_schedule_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    last_backup: str | None = Field(default=None, description="The VMBackup the last run made.")
    missed_runs: int | None = Field(
        default=None, ge=0, description="Runs not started in time (controller down, deadline)."
    )
    last_missed_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    kept: int | None = Field(default=None, ge=0, description="Completed backups kept.")
    conditions: Conditions
