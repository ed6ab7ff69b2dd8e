"""What a VMBackupSchedule does now: a pure function of its spec, status, backups and time.

- **Runs.** The moments of the schedule after the last run up to now are due; only the
  latest is started, and only within ``startingDeadline`` of its moment. The others (the
  controller was down, the deadline passed, the previous backup still ran) are *missed*:
  counted in status and reported with an Event, never made up later.
- **Full every N.** Every ``fullEvery``-th backup is full, so an incremental chain ends
  and the one before can be pruned.
- **Retention.** The union of keepLast / keepDaily / keepWeekly over the Completed backups,
  closed over parents (a kept incremental keeps what it builds on), so pruning never
  breaks a chain. Failed backups older than the newest Completed one go too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from croniter import croniter

from virtfleet.api.backup import BackupMode
from virtfleet.api.quantity import parse_duration
from virtfleet.api.schedule import VMBackupScheduleSpec

DEFAULT_FULL_EVERY = 7
DEFAULT_KEEP_LAST = 7
DEFAULT_DEADLINE_SECONDS = 300.0
#: Due moments looked at, at most: the newest ones (a schedule every second, down for a
#: day, stays cheap; the count of missed runs then says "at least").
MAX_DUE = 1_000
SCHEDULE_LABEL = "virtfleet.io/schedule"


@dataclass(frozen=True)
class ScheduledBackup:
    """A VMBackup this schedule made (by its label)."""

    name: str
    phase: str | None
    type: str | None
    parent: str | None
    created: datetime
    completed: datetime | None
    deleting: bool = False


@dataclass(frozen=True)
class ScheduleDecision:
    #: ``(name, moment, mode)`` of the backup to create now, if any.
    create: tuple[str, datetime, BackupMode] | None
    #: The moment of the last run (started or missed) to record.
    last_schedule_time: datetime | None
    next_schedule_time: datetime
    missed: int
    missed_reason: str | None
    prune: tuple[str, ...] = ()
    kept: tuple[str, ...] = field(default=())


def next_after(schedule: str, moment: datetime) -> datetime:
    """The schedule's first moment strictly after ``moment`` (UTC)."""
    if schedule.startswith("@every "):
        return moment + timedelta(seconds=parse_duration(schedule.removeprefix("@every ")))
    found: datetime = croniter(schedule, moment).get_next(datetime)
    return found


def due(schedule: str, since: datetime, now: datetime) -> list[datetime]:
    """Moments in ``(since, now]``, oldest first: at most the newest :data:`MAX_DUE`, found
    from ``now`` backwards, so the work is bounded however long the gap."""
    if now <= since:
        return []
    if schedule.startswith("@every "):
        step = timedelta(seconds=parse_duration(schedule.removeprefix("@every ")))
        count = int((now - since) / step)
        first = max(1, count - MAX_DUE + 1)
        return [since + step * n for n in range(first, count + 1)]
    moments: list[datetime] = []
    back = croniter(schedule, now + timedelta(microseconds=1))
    while len(moments) < MAX_DUE:
        moment: datetime = back.get_prev(datetime)
        if moment <= since:
            break
        moments.append(moment)
    moments.reverse()
    return moments


def backup_name(schedule_name: str, moment: datetime) -> str:
    return f"{schedule_name}-{moment:%Y%m%d%H%M%S}"


def mode_for(spec: VMBackupScheduleSpec, backups: Sequence[ScheduledBackup]) -> BackupMode:
    """Full when the last ``fullEvery - 1`` backups since a full one were not full."""
    every = spec.full_every or DEFAULT_FULL_EVERY
    if spec.mode == BackupMode.FULL or every == 1:
        return BackupMode.FULL
    if not any(b.type == "Full" and b.phase == "Completed" for b in backups):
        # Nothing to build on yet (an Incremental schedule would otherwise fail forever).
        return BackupMode.FULL
    since_full = 0
    for b in sorted(backups, key=lambda b: b.created, reverse=True):
        if b.phase == "Failed":
            continue
        if b.type == "Full":
            break
        since_full += 1
    else:
        if not backups:
            return spec.mode  # the first one: Auto makes it full anyway
    return BackupMode.FULL if since_full >= every - 1 else spec.mode


def retained(spec: VMBackupScheduleSpec, backups: Sequence[ScheduledBackup]) -> set[str]:
    """Names the retention keeps, closed over parents."""
    rules = spec.retention
    keep_last = rules.keep_last if rules else DEFAULT_KEEP_LAST
    keep_daily = rules.keep_daily if rules else None
    keep_weekly = rules.keep_weekly if rules else None
    done = sorted(
        (
            b
            for b in backups
            if b.phase == "Completed" and b.completed is not None and not b.deleting
        ),
        key=lambda b: b.completed or b.created,
        reverse=True,
    )
    keep: set[str] = {b.name for b in done[: keep_last or 0]}
    for count, period in ((keep_daily, "day"), (keep_weekly, "week")):
        if not count:
            continue
        seen: list[tuple[int, int]] = []
        for b in done:
            assert b.completed is not None
            iso = b.completed.isocalendar()
            key = (
                (b.completed.year, b.completed.timetuple().tm_yday)
                if period == "day"
                else (iso.year, iso.week)
            )
            if key not in seen:
                if len(seen) == count:
                    break
                seen.append(key)
                keep.add(b.name)
    # The closure stays among this schedule's backups (a parent made by hand is not ours).
    parents = {b.name: b.parent for b in backups}
    stack = list(keep)
    while stack:
        parent = parents.get(stack.pop())
        if parent and parent in parents and parent not in keep:
            keep.add(parent)
            stack.append(parent)
    return keep


def decide_schedule(
    name: str,
    spec: VMBackupScheduleSpec,
    last_schedule_time: datetime | None,
    created: datetime,
    now: datetime,
    backups: Sequence[ScheduledBackup],
) -> ScheduleDecision:
    since = last_schedule_time or created
    moments = due(spec.schedule, since, now)
    deadline = (
        parse_duration(spec.starting_deadline)
        if spec.starting_deadline
        else DEFAULT_DEADLINE_SECONDS
    )
    create = None
    missed = 0
    reason = None
    last = last_schedule_time
    if moments:
        latest = moments[-1]
        last = latest
        if not spec.suspend:
            missed = len(moments) - 1
            running = [b.name for b in backups if b.phase not in ("Completed", "Failed")]
            if (now - latest).total_seconds() > deadline:
                missed += 1
                reason = (
                    f"the run of {latest:%Y-%m-%dT%H:%M:%SZ} was not started within its deadline"
                )
            elif running:
                missed += 1
                reason = f"backup {running[0]} of the previous run is still in progress"
            else:
                create = (backup_name(name, latest), latest, mode_for(spec, backups))
            if missed and reason is None:
                reason = f"{missed} run(s) passed while the controller could not start them"
    kept = retained(spec, backups)
    newest_done = max(
        (b.completed for b in backups if b.phase == "Completed" and b.completed), default=None
    )
    prune = sorted(
        b.name
        for b in backups
        if not b.deleting
        and (
            (b.phase == "Completed" and b.name not in kept)
            or (b.phase == "Failed" and newest_done is not None and b.created < newest_done)
        )
    )
    return ScheduleDecision(
        create=create,
        last_schedule_time=last,
        # Anchored on the runs, not on now: "@every 1h" stays on its grid.
        next_schedule_time=next_after(spec.schedule, moments[-1] if moments else since),
        missed=missed,
        missed_reason=reason,
        prune=tuple(prune),
        kept=tuple(sorted(kept)),
    )
