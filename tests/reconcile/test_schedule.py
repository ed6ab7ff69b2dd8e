"""VMBackupSchedule decisions: due runs, missed runs, full-every-N, retention and pruning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtfleet.api.backup import BackupMode
from virtfleet.api.schedule import VMBackupScheduleSpec
from virtfleet.reconcile.schedule import (
    DEFAULT_DEADLINE_SECONDS,
    DEFAULT_FULL_EVERY,
    DEFAULT_KEEP_LAST,
    MAX_DUE,
    ScheduledBackup,
    ScheduleDecision,
    decide_schedule,
    due,
    mode_for,
    next_after,
    retained,
)

BASE = datetime(2026, 1, 10, tzinfo=UTC)
CREATED = datetime(2026, 1, 1, 8, 30, tzinfo=UTC)
NAME = "nightly"
IN_PROGRESS_PHASES = ["Pending", "InProgress", "Uploading", None]


def at(day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    """A UTC moment in January 2026."""
    return datetime(2026, 1, day, hour, minute, second, tzinfo=UTC)


def make_spec(schedule: str = "0 2 * * *", **fields: Any) -> VMBackupScheduleSpec:
    """A schedule spec as the apiserver would hold it (camelCase fields)."""
    return VMBackupScheduleSpec.model_validate(
        {"schedule": schedule, "vmName": "web", "location": "s3-main", **fields}
    )


def backup(
    name: str,
    created: datetime,
    *,
    phase: str | None = "Completed",
    kind: str | None = "Full",
    parent: str | None = None,
    took: timedelta = timedelta(minutes=10),
    deleting: bool = False,
) -> ScheduledBackup:
    """A scheduled backup; Completed ones finish ``took`` after they were created."""
    return ScheduledBackup(
        name=name,
        phase=phase,
        type=kind,
        parent=parent,
        created=created,
        completed=created + took if phase == "Completed" else None,
        deleting=deleting,
    )


def decide(
    spec: VMBackupScheduleSpec,
    last: datetime | None,
    now: datetime,
    backups: Sequence[ScheduledBackup] = (),
) -> ScheduleDecision:
    return decide_schedule(NAME, spec, last, CREATED, now, backups)


# --- next_after ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "moment", "expected"),
    [
        ("0 2 * * *", at(10, 1, 59, 59), at(10, 2)),
        ("0 2 * * *", at(10, 2), at(11, 2)),
        ("0 2 * * *", at(10, 2, 0, 1), at(11, 2)),
        ("0 2 * * *", at(10, 23), at(11, 2)),
        ("*/15 * * * *", at(10, 12, 7), at(10, 12, 15)),
        ("*/15 * * * *", at(10, 12, 15), at(10, 12, 30)),
        ("*/15 * * * *", at(10, 12, 59, 59), at(10, 13)),
        ("@daily", at(10), at(11)),
        ("@daily", at(10, 13, 45), at(11)),
        ("@every 20s", at(10, 12, 0, 7), at(10, 12, 0, 27)),
        ("@every 90m", at(10, 23, 0), at(11, 0, 30)),
    ],
)
def test_next_after_is_the_first_moment_strictly_after(
    schedule: str, moment: datetime, expected: datetime
) -> None:
    """A moment on the schedule itself is not its own next one: the run after it is."""
    found = next_after(schedule, moment)
    assert found == expected
    assert found.utcoffset() == timedelta(0)


def test_next_after_drops_sub_second_parts_for_cron() -> None:
    """A creationTimestamp just past a cron moment does not yield that moment again."""
    assert next_after("0 2 * * *", at(10, 2) + timedelta(microseconds=500)) == at(11, 2)


def test_every_is_anchored_on_the_given_moment_not_on_a_grid() -> None:
    """'@every 20s' counts from the last run, whatever second it fell on."""
    odd = at(10, 12, 0, 7) + timedelta(milliseconds=250)
    assert next_after("@every 20s", odd) == odd + timedelta(seconds=20)


# --- due ---------------------------------------------------------------------------------------


def test_due_is_the_moments_in_since_to_now_oldest_first() -> None:
    """``since`` itself is excluded (it ran already), ``now`` is included."""
    assert due("0 2 * * *", at(8, 2), at(10, 2)) == [at(9, 2), at(10, 2)]
    assert due("0 2 * * *", at(8, 1), at(10, 1, 59)) == [at(8, 2), at(9, 2)]


def test_due_every_fifteen_minutes() -> None:
    assert due("*/15 * * * *", at(10, 12), at(10, 13)) == [
        at(10, 12, 15),
        at(10, 12, 30),
        at(10, 12, 45),
        at(10, 13),
    ]


def test_due_daily_macro_is_midnight_utc() -> None:
    assert due("@daily", at(7, 12), at(10, 12)) == [at(8), at(9), at(10)]


def test_due_every_counts_from_the_last_run_not_from_now() -> None:
    """'@every 20s' after a run at :07 is due at :27, :47, :07... whenever now is."""
    assert due("@every 20s", at(10, 12, 0, 7), at(10, 12, 1, 10)) == [
        at(10, 12, 0, 27),
        at(10, 12, 0, 47),
        at(10, 12, 1, 7),
    ]


def test_nothing_is_due_before_the_first_moment() -> None:
    assert due("0 2 * * *", at(10, 2), at(10, 23, 59)) == []
    assert due("@every 20s", at(10, 12), at(10, 12, 0, 19)) == []
    assert due("@every 20s", at(10, 12), at(10, 12)) == []


def test_due_keeps_only_the_newest_max_due_moments() -> None:
    """A long outage of a frequent schedule yields at most MAX_DUE moments: the newest."""
    since = at(10)
    now = since + timedelta(seconds=2 * MAX_DUE + 5)
    moments = due("@every 1s", since, now)
    assert len(moments) == MAX_DUE
    assert moments[-1] == now
    assert moments[0] == now - timedelta(seconds=MAX_DUE - 1)
    assert moments == sorted(moments)


SCHEDULES = ["0 2 * * *", "*/15 * * * *", "@daily", "@hourly", "@every 20s", "@every 90m"]


@given(
    schedule=st.sampled_from(SCHEDULES),
    start=st.integers(0, 30 * 86_400),
    span=st.integers(0, 2 * 86_400),
)
@settings(deadline=None)
def test_due_moments_are_the_schedule_between_since_and_now(
    schedule: str, start: int, span: int
) -> None:
    """Each due moment is the schedule's next after the one before; none is left out."""
    since = BASE + timedelta(seconds=start)
    now = since + timedelta(seconds=span)
    moments = due(schedule, since, now)
    assert len(moments) <= MAX_DUE
    assert all(since < m <= now for m in moments)
    # Past MAX_DUE only the newest are returned: the chain then starts at the first one.
    previous = since if len(moments) < MAX_DUE else moments[0]
    for moment in moments[0 if len(moments) < MAX_DUE else 1 :]:
        assert moment == next_after(schedule, previous)
        previous = moment
    assert next_after(schedule, previous) > now


# --- decide_schedule: runs ---------------------------------------------------------------------


def test_nothing_due_creates_nothing_and_says_when_next() -> None:
    """Between runs: no backup, nothing missed, the last run stays, the next is tomorrow 02:00."""
    decision = decide(make_spec(), at(10, 2), at(10, 12))
    assert decision.create is None
    assert decision.missed == 0
    assert decision.missed_reason is None
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)


def test_a_new_schedule_waits_for_its_first_moment() -> None:
    """No lastScheduleTime: runs count from the schedule's creation, none before it."""
    decision = decide_schedule(NAME, make_spec(), None, at(10, 1), at(10, 1, 30), [])
    assert decision.create is None
    assert decision.missed == 0
    assert decision.last_schedule_time is None
    assert decision.next_schedule_time == at(10, 2)


def test_a_due_run_within_its_deadline_is_created() -> None:
    """The run of 02:00 seen at 02:03: created, named after its moment, recorded as the last."""
    decision = decide(make_spec(), at(9, 2), at(10, 2, 3))
    # The first backup of a schedule is full (nothing to build on yet).
    assert decision.create == ("nightly-20260110020000", at(10, 2), BackupMode.FULL)
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)
    assert decision.missed == 0
    assert decision.missed_reason is None


def test_the_first_run_of_a_new_schedule_is_created() -> None:
    decision = decide_schedule(NAME, make_spec(), None, at(10, 1), at(10, 2, 0, 1), [])
    assert decision.create is not None
    assert decision.create[:2] == ("nightly-20260110020000", at(10, 2))


def test_the_default_deadline_is_five_minutes_inclusive() -> None:
    """Exactly 5 minutes late still starts; a second more is missed."""
    assert DEFAULT_DEADLINE_SECONDS == 300.0
    on_time = decide(make_spec(), at(9, 2), at(10, 2, 5))
    assert on_time.create is not None
    late = decide(make_spec(), at(9, 2), at(10, 2, 5, 1))
    assert late.create is None
    assert late.missed == 1


def test_several_due_runs_start_only_the_latest() -> None:
    """The controller was down three nights: the latest run starts, the two before are missed."""
    decision = decide(make_spec(), at(7, 2), at(10, 2, 1))
    assert decision.create is not None
    assert decision.create[:2] == ("nightly-20260110020000", at(10, 2))
    assert decision.missed == 2
    assert decision.missed_reason is not None
    assert "2 run(s)" in decision.missed_reason
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)


def test_a_latest_run_past_its_deadline_is_missed_too() -> None:
    """Down until 03:00 with a 1m deadline: nothing starts now; all three runs are missed."""
    decision = decide(make_spec(startingDeadline="1m"), at(7, 2), at(10, 3))
    assert decision.create is None
    assert decision.missed == 3
    assert decision.missed_reason is not None
    assert "2026-01-10T02:00:00Z" in decision.missed_reason
    assert "deadline" in decision.missed_reason
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)


def test_a_single_run_past_a_custom_deadline_is_missed() -> None:
    decision = decide(make_spec(startingDeadline="1m"), at(9, 2), at(10, 2, 1, 30))
    assert decision.create is None
    assert decision.missed == 1
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)


def test_a_long_custom_deadline_still_starts_a_late_run() -> None:
    decision = decide(make_spec(startingDeadline="2h"), at(9, 2), at(10, 3, 59))
    assert decision.create is not None
    assert decision.create[1] == at(10, 2)
    assert decision.missed == 0


@pytest.mark.parametrize("phase", IN_PROGRESS_PHASES)
def test_a_previous_backup_in_progress_misses_the_run(phase: str | None) -> None:
    """Runs don't overlap: the new one is missed (not queued), and the reason names the backup."""
    previous = backup("nightly-20260109020000", at(9, 2), phase=phase, kind=None)
    decision = decide(make_spec(), at(9, 2), at(10, 2, 1), [previous])
    assert decision.create is None
    assert decision.missed == 1
    assert decision.missed_reason is not None
    assert "nightly-20260109020000" in decision.missed_reason
    assert "in progress" in decision.missed_reason
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)


def test_a_backup_in_progress_blocks_nothing_when_nothing_is_due() -> None:
    running = backup("nightly-20260110020000", at(10, 2), phase="InProgress", kind=None)
    decision = decide(make_spec(), at(10, 2), at(10, 2, 30), [running])
    assert decision.create is None
    assert decision.missed == 0
    assert decision.missed_reason is None


@pytest.mark.parametrize("phase", ["Completed", "Failed"])
def test_a_finished_previous_backup_does_not_block(phase: str) -> None:
    previous = backup("nightly-20260109020000", at(9, 2), phase=phase)
    decision = decide(make_spec(), at(9, 2), at(10, 2, 1), [previous])
    assert decision.create is not None
    assert decision.missed == 0


def test_several_due_while_a_backup_runs_are_all_missed() -> None:
    running = backup("nightly-20260107020000", at(7, 2), phase="Uploading", kind=None)
    decision = decide(make_spec(), at(7, 2), at(10, 2, 1), [running])
    assert decision.create is None
    assert decision.missed == 3
    assert decision.missed_reason is not None
    assert "nightly-20260107020000" in decision.missed_reason


def test_a_suspended_schedule_creates_and_misses_nothing_but_moves_on() -> None:
    """Suspended runs are skipped on purpose: not missed, and not made up after resuming."""
    decision = decide(make_spec(suspend=True), at(7, 2), at(10, 2, 1))
    assert decision.create is None
    assert decision.missed == 0
    assert decision.missed_reason is None
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)
    resumed = decide(make_spec(), decision.last_schedule_time, at(10, 12))
    assert resumed.create is None
    assert resumed.missed == 0


def test_a_suspended_schedule_with_nothing_due_keeps_its_last_run() -> None:
    decision = decide(make_spec(suspend=True), at(10, 2), at(10, 12))
    assert decision.last_schedule_time == at(10, 2)
    assert decision.next_schedule_time == at(11, 2)


def test_every_is_anchored_on_the_runs_not_on_now() -> None:
    """'@every 20s' last run at 12:00:00, seen at 12:00:50: the run of :40 starts (:20 is
    missed) and the next is 12:01:00, not now + 20s."""
    decision = decide(make_spec("@every 20s"), at(10, 12), at(10, 12, 0, 50))
    assert decision.create is not None
    assert decision.create[:2] == ("nightly-20260110120040", at(10, 12, 0, 40))
    assert decision.missed == 1
    assert decision.last_schedule_time == at(10, 12, 0, 40)
    assert decision.next_schedule_time == at(10, 12, 1)


def test_every_starts_from_the_creation_of_a_new_schedule() -> None:
    created = at(10, 12, 0, 7)
    decision = decide_schedule(NAME, make_spec("@every 20s"), None, created, at(10, 12, 0, 30), [])
    assert decision.create is not None
    assert decision.create[:2] == ("nightly-20260110120027", at(10, 12, 0, 27))
    assert decision.next_schedule_time == at(10, 12, 0, 47)


def test_every_with_nothing_due_is_next_on_its_own_grid() -> None:
    decision = decide(make_spec("@every 1h"), at(10, 10, 17), at(10, 10, 50))
    assert decision.create is None
    assert decision.next_schedule_time == at(10, 11, 17)


def test_every_fifteen_minutes_names_the_moment() -> None:
    decision = decide(make_spec("*/15 * * * *"), at(10, 12), at(10, 12, 15, 20))
    assert decision.create is not None
    assert decision.create[0] == "nightly-20260110121500"
    assert decision.next_schedule_time == at(10, 12, 30)


def test_the_created_backup_takes_its_mode_from_mode_for() -> None:
    """fullEvery 3 after a full and two incrementals: the run is Full; after one, Incremental."""
    history = [
        backup("b1", at(7, 2), kind="Full"),
        backup("b2", at(8, 2), kind="Incremental", parent="b1"),
        backup("b3", at(9, 2), kind="Incremental", parent="b2"),
    ]
    spec = make_spec(mode="Incremental", fullEvery=3)
    decision = decide(spec, at(9, 2), at(10, 2, 1), history)
    assert decision.create is not None
    assert decision.create[2] == BackupMode.FULL
    shorter = decide(spec, at(9, 2), at(10, 2, 1), history[:2])
    assert shorter.create is not None
    assert shorter.create[2] == BackupMode.INCREMENTAL


@given(
    schedule=st.sampled_from(SCHEDULES),
    since=st.integers(0, 30 * 86_400),
    span=st.integers(0, 3 * 86_400),
    suspend=st.booleans(),
)
@settings(deadline=None)
def test_decisions_never_create_more_than_the_latest_due_run(
    schedule: str, since: int, span: int, suspend: bool
) -> None:
    """Whatever the gap: at most one backup, for the latest due moment; the next run is later
    than now; suspended schedules never create or miss."""
    last = BASE + timedelta(seconds=since)
    now = last + timedelta(seconds=span)
    moments = due(schedule, last, now)
    decision = decide(make_spec(schedule, suspend=suspend), last, now)
    assert decision.next_schedule_time > now
    assert decision.last_schedule_time == (moments[-1] if moments else last)
    if suspend or not moments:
        assert decision.create is None
        assert decision.missed == 0
        return
    started = 1 if decision.create is not None else 0
    assert decision.missed + started == len(moments)
    if decision.create is not None:
        assert decision.create[1] == moments[-1]
        assert (now - moments[-1]).total_seconds() <= DEFAULT_DEADLINE_SECONDS
    assert (decision.missed_reason is None) == (decision.missed == 0)


# --- mode_for ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["Auto", "Incremental", "Full"])
def test_the_first_backup_is_full(mode: str) -> None:
    """Nothing to build on yet: an Incremental schedule would otherwise fail forever."""
    assert mode_for(make_spec(mode=mode, fullEvery=3), []) == BackupMode.FULL


def test_a_full_mode_schedule_is_always_full() -> None:
    history = [backup("b1", at(8), kind="Full")]
    assert mode_for(make_spec(mode="Full"), history) == BackupMode.FULL


@pytest.mark.parametrize("mode", ["Auto", "Incremental"])
def test_full_every_one_is_always_full(mode: str) -> None:
    spec = make_spec(mode=mode, fullEvery=1)
    assert mode_for(spec, []) == BackupMode.FULL
    assert mode_for(spec, [backup("b1", at(8), kind="Full")]) == BackupMode.FULL


def simulate(
    spec: VMBackupScheduleSpec,
    runs: int,
    failures: Sequence[bool] = (),
    history: Sequence[ScheduledBackup] = (),
) -> list[str]:
    """Types of the Completed backups a schedule makes after ``history``, typed like the agent
    does: Full when asked, incremental when a completed backup precedes. ``failures[i]``:
    run i fails."""
    made = list(history)
    completed: list[str] = []
    for i in range(runs):
        mode = mode_for(spec, made)
        has_parent = any(b.phase == "Completed" for b in made)
        kind = "Full" if mode == BackupMode.FULL or not has_parent else "Incremental"
        created = BASE + timedelta(hours=i)
        if i < len(failures) and failures[i]:
            made.append(backup(f"b{i}", created, phase="Failed", kind=kind))
        else:
            made.append(backup(f"b{i}", created, kind=kind))
            completed.append(kind)
    return completed


def test_every_full_every_th_backup_is_full() -> None:
    """fullEvery 3 with Auto: F I I F I I F ... (the first one made full by Auto)."""
    kinds = simulate(make_spec(fullEvery=3), 10)
    assert kinds == ["Full", "Incremental", "Incremental"] * 3 + ["Full"]


def test_an_incremental_schedule_still_runs_full_every_n() -> None:
    """mode Incremental after a full: every third is Full all the same."""
    spec = make_spec(mode="Incremental", fullEvery=3)
    kinds = simulate(spec, 7, history=[backup("seed", BASE - timedelta(days=1))])
    assert kinds == ["Incremental", "Incremental", "Full"] * 2 + ["Incremental"]


def test_full_every_defaults_to_seven() -> None:
    kinds = simulate(make_spec(), 15)
    assert DEFAULT_FULL_EVERY == 7
    assert kinds == (["Full"] + ["Incremental"] * 6) * 2 + ["Full"]


def test_failed_backups_do_not_count_towards_full_every() -> None:
    """fullEvery 3 after F, I: failed runs in between (of any type) leave the count at 1."""
    spec = make_spec(fullEvery=3)
    history = [
        backup("b1", at(1), kind="Full"),
        backup("b2", at(2), kind="Incremental", parent="b1"),
        backup("b3", at(3), phase="Failed", kind="Incremental"),
        backup("b4", at(4), phase="Failed", kind=None),
    ]
    assert mode_for(spec, history) == BackupMode.AUTO
    history.append(backup("b5", at(5), kind="Incremental", parent="b2"))
    assert mode_for(spec, history) == BackupMode.FULL


def test_a_failed_full_does_not_end_the_chain() -> None:
    """A failed full backup made nothing to build on: the count goes on from the last good one."""
    spec = make_spec(mode="Incremental", fullEvery=3)
    history = [
        backup("b1", at(1), kind="Full"),
        backup("b2", at(2), kind="Incremental", parent="b1"),
        backup("b3", at(3), phase="Failed", kind="Full"),
    ]
    assert mode_for(spec, history) == BackupMode.INCREMENTAL
    history.append(backup("b4", at(4), kind="Incremental", parent="b2"))
    assert mode_for(spec, history) == BackupMode.FULL


def test_only_failed_backups_so_far_is_like_the_first() -> None:
    spec = make_spec(fullEvery=3)
    history = [backup(f"b{i}", at(i), phase="Failed", kind=None) for i in range(1, 4)]
    assert mode_for(spec, history) == BackupMode.FULL


def test_mode_for_looks_at_creation_order_not_list_order() -> None:
    spec = make_spec(mode="Incremental", fullEvery=2)
    newest_full = [
        backup("b2", at(2), kind="Full"),
        backup("b1", at(1), kind="Incremental"),
    ]
    assert mode_for(spec, newest_full) == BackupMode.INCREMENTAL
    assert mode_for(spec, newest_full[::-1]) == BackupMode.INCREMENTAL
    newest_incremental = [
        backup("b2", at(2), kind="Incremental", parent="b1"),
        backup("b1", at(1), kind="Full"),
    ]
    assert mode_for(spec, newest_incremental) == BackupMode.FULL
    assert mode_for(spec, newest_incremental[::-1]) == BackupMode.FULL


@given(every=st.integers(2, 9), failures=st.lists(st.booleans(), max_size=40))
@settings(deadline=None)
def test_completed_backups_are_full_exactly_every_n(every: int, failures: list[bool]) -> None:
    """However runs fail in between, the Completed ones go F, then every-1 incrementals."""
    kinds = simulate(make_spec(fullEvery=every), len(failures), failures)
    expected = [("Full" if i % every == 0 else "Incremental") for i in range(len(kinds))]
    assert kinds == expected


# --- retained ----------------------------------------------------------------------------------


def fulls(
    count: int, *, start: datetime = BASE, step: timedelta = timedelta(days=1)
) -> list[ScheduledBackup]:
    return [backup(f"b{i:02d}", start + i * step) for i in range(count)]


def test_default_retention_keeps_the_last_seven() -> None:
    backups = fulls(10)
    assert DEFAULT_KEEP_LAST == 7
    assert retained(make_spec(), backups) == {b.name for b in backups[3:]}


def test_keep_last_keeps_the_newest_completed() -> None:
    """Failed and unfinished backups neither count nor are kept by keepLast."""
    backups = [
        *fulls(5),
        backup("failed", BASE + timedelta(days=5), phase="Failed"),
        backup("running", BASE + timedelta(days=6), phase="InProgress", kind=None),
    ]
    kept = retained(make_spec(retention={"keepLast": 2}), backups)
    assert kept == {"b03", "b04"}


def test_keep_last_orders_by_completion() -> None:
    """Newest means finished last."""
    slow = backup("slow", at(1), took=timedelta(hours=20))
    quick = backup("quick", at(1, 2))
    assert retained(make_spec(retention={"keepLast": 1}), [slow, quick]) == {"slow"}


def test_keep_last_larger_than_the_backups_keeps_all() -> None:
    backups = fulls(3)
    assert retained(make_spec(retention={"keepLast": 10}), backups) == {"b00", "b01", "b02"}


def test_keep_daily_keeps_the_newest_of_each_day() -> None:
    """Three backups a day for four days, keepDaily 2: the last one of each of the last 2 days."""
    backups = [
        backup(f"d{day}-{hour:02d}", at(day, hour)) for day in (5, 6, 7, 8) for hour in (1, 9, 17)
    ]
    kept = retained(make_spec(retention={"keepDaily": 2}), backups)
    assert kept == {"d8-17", "d7-17"}


def test_keep_daily_goes_by_completion_day() -> None:
    """A backup started before midnight and finished after it belongs to the next day."""
    late = backup("late", at(7, 23, 55), took=timedelta(minutes=10))
    earlier = backup("earlier", at(8, 1))
    day_before = backup("day-before", at(7, 12))
    kept = retained(make_spec(retention={"keepDaily": 2}), [day_before, late, earlier])
    assert kept == {"earlier", "day-before"}


def test_keep_weekly_keeps_the_newest_of_each_iso_week() -> None:
    """ISO weeks start on Monday and cross years: 2025-12-29 is in 2026-W01."""
    backups = [
        backup("w51-mon", datetime(2025, 12, 15, tzinfo=UTC)),
        backup("w52-mon", datetime(2025, 12, 22, tzinfo=UTC)),
        backup("w52-sun", datetime(2025, 12, 28, tzinfo=UTC)),
        backup("w01-mon", datetime(2025, 12, 29, tzinfo=UTC)),
        backup("w01-thu", datetime(2026, 1, 1, tzinfo=UTC)),
    ]
    kept = retained(make_spec(retention={"keepWeekly": 2}), backups)
    assert kept == {"w01-thu", "w52-sun"}
    kept = retained(make_spec(retention={"keepWeekly": 3}), backups)
    assert kept == {"w01-thu", "w52-sun", "w51-mon"}


def test_retention_is_the_union_of_its_rules() -> None:
    """keepLast 2 and keepDaily 3 over two backups a day: the last two, plus the newest of the
    two days before."""
    backups = [backup(f"d{day}-{hour:02d}", at(day, hour)) for day in (5, 6, 7) for hour in (6, 18)]
    kept = retained(make_spec(retention={"keepLast": 2, "keepDaily": 3}), backups)
    assert kept == {"d7-18", "d7-06", "d6-18", "d5-18"}
    everything = retained(
        make_spec(retention={"keepLast": 1, "keepDaily": 1, "keepWeekly": 1}), backups
    )
    assert everything == {"d7-18"}


def test_a_rule_left_out_of_retention_keeps_nothing_by_itself() -> None:
    """With retention given, keepLast defaults to nothing (not 7): only the rules named count."""
    backups = fulls(10, step=timedelta(hours=1))
    kept = retained(make_spec(retention={"keepDaily": 1}), backups)
    assert kept == {"b09"}


def test_a_kept_incremental_keeps_its_chain() -> None:
    """keepLast 1 on F <- I1 <- I2: the whole chain stays, an older chain goes."""
    backups = [
        backup("old-full", at(1)),
        backup("old-inc", at(2), kind="Incremental", parent="old-full"),
        backup("full", at(3)),
        backup("inc-1", at(4), kind="Incremental", parent="full"),
        backup("inc-2", at(5), kind="Incremental", parent="inc-1"),
    ]
    kept = retained(make_spec(retention={"keepLast": 1}), backups)
    assert kept == {"full", "inc-1", "inc-2"}


def test_chains_kept_by_daily_rules_keep_their_fulls() -> None:
    """keepDaily 2 keeps day 4's full and day 3's last incremental, and with it its chain
    back to day 1's full; day 3's first incremental is in that chain too."""
    backups = [
        backup("full", at(1)),
        backup("inc-2", at(2), kind="Incremental", parent="full"),
        backup("inc-3", at(3), kind="Incremental", parent="inc-2"),
        backup("inc-3b", at(3, 12), kind="Incremental", parent="inc-3"),
        backup("full-4", at(4, 12)),
    ]
    kept = retained(make_spec(retention={"keepDaily": 2}), backups)
    assert kept == {"full-4", "inc-3b", "inc-3", "inc-2", "full"}


# --- prune -----------------------------------------------------------------------------------


def test_completed_backups_not_kept_are_pruned() -> None:
    backups = fulls(5)
    decision = decide(make_spec(retention={"keepLast": 2}), at(20), at(20, 1), backups)
    assert decision.prune == ("b00", "b01", "b02")
    assert decision.kept == ("b03", "b04")


def test_failed_backups_older_than_the_newest_completed_are_pruned() -> None:
    """A failed run is kept as evidence until a later one succeeds."""
    backups = [
        backup("good-1", at(1)),
        backup("failed-2", at(2), phase="Failed"),
        backup("good-3", at(3)),
        backup("failed-4", at(4), phase="Failed"),
    ]
    decision = decide(make_spec(retention={"keepLast": 5}), at(20), at(20, 1), backups)
    assert decision.prune == ("failed-2",)


def test_failed_backups_stay_while_nothing_completed() -> None:
    backups = [backup(f"failed-{i}", at(i), phase="Failed") for i in range(1, 4)]
    decision = decide(make_spec(), at(20), at(20, 1), backups)
    assert decision.prune == ()
    assert decision.kept == ()


def test_backups_being_deleted_are_not_pruned_again() -> None:
    backups = [
        backup("old", at(1), deleting=True),
        backup("failed", at(2), phase="Failed", deleting=True),
        *fulls(2, start=at(3)),
    ]
    decision = decide(make_spec(retention={"keepLast": 1}), at(20), at(20, 1), backups)
    assert decision.prune == ("b00",)


@pytest.mark.parametrize("phase", IN_PROGRESS_PHASES)
def test_unfinished_backups_are_never_pruned(phase: str | None) -> None:
    backups = [
        backup("early-running", at(1), phase=phase, kind=None),
        *fulls(3, start=at(2)),
    ]
    decision = decide(make_spec(retention={"keepLast": 1}), at(20), at(20, 1), backups)
    assert decision.prune == ("b00", "b01")


def test_prune_never_breaks_a_kept_chain() -> None:
    backups = [
        backup("full", at(1)),
        backup("inc-1", at(2), kind="Incremental", parent="full"),
        backup("inc-2", at(3), kind="Incremental", parent="inc-1"),
    ]
    decision = decide(make_spec(retention={"keepLast": 1}), at(20), at(20, 1), backups)
    assert decision.prune == ()
    assert decision.kept == ("full", "inc-1", "inc-2")


def test_pruning_happens_whether_or_not_a_run_is_due() -> None:
    backups = fulls(3)
    spec = make_spec(retention={"keepLast": 1})
    assert decide(spec, at(20, 2), at(20, 3), backups).prune == ("b00", "b01")
    created = decide(spec, at(19, 2), at(20, 2, 1), backups)
    assert created.create is not None
    assert created.prune == ("b00", "b01")
    suspended = make_spec(retention={"keepLast": 1}, suspend=True)
    assert decide(suspended, at(19, 2), at(20, 3), backups).prune == ("b00", "b01")


def test_a_backup_being_deleted_does_not_take_a_retention_slot() -> None:
    """keepLast 2, the user deletes the newest one: the two before it stay."""
    backups = [*fulls(2), backup("newest", BASE + timedelta(days=2), deleting=True)]
    decision = decide(make_spec(retention={"keepLast": 2}), at(20), at(20, 1), backups)
    assert decision.prune == ()


# --- properties over random chains ---------------------------------------------------------


@dataclass(frozen=True)
class Step:
    full: bool
    failed: bool
    gap_hours: int


STEPS = st.lists(
    st.builds(
        Step,
        full=st.booleans(),
        failed=st.sampled_from([False, False, True]),
        gap_hours=st.integers(1, 60),
    ),
    max_size=30,
)
RETENTION = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "keepLast": st.integers(1, 6),
            "keepDaily": st.integers(1, 6),
            "keepWeekly": st.integers(1, 4),
        },
    ).filter(bool),
)


def chain(steps: Sequence[Step], running: bool) -> list[ScheduledBackup]:
    """Backups made one after another: an incremental builds on the previous good backup
    (the first good one is full whatever was asked); a last one may still be running."""
    backups: list[ScheduledBackup] = []
    created = BASE
    previous: str | None = None
    for i, step in enumerate(steps):
        created += timedelta(hours=step.gap_hours)
        full = step.full or previous is None
        name = f"b{i:02d}"
        backups.append(
            backup(
                name,
                created,
                phase="Failed" if step.failed else "Completed",
                kind="Full" if full else "Incremental",
                parent=None if full else previous,
                took=timedelta(minutes=30),
            )
        )
        if not step.failed:
            previous = name
    if running:
        backups.append(
            backup(
                "running",
                created + timedelta(hours=1),
                phase="InProgress",
                kind="Incremental",
                parent=previous,
            )
        )
    return backups


def ancestors(name: str, backups: Sequence[ScheduledBackup]) -> list[str]:
    parents = {b.name: b.parent for b in backups}
    found: list[str] = []
    parent = parents.get(name)
    while parent is not None:
        found.append(parent)
        parent = parents.get(parent)
    return found


@given(steps=STEPS, retention=RETENTION, running=st.booleans())
@settings(deadline=None)
def test_no_pruned_backup_is_the_ancestor_of_a_kept_one(
    steps: list[Step], retention: dict[str, int] | None, running: bool
) -> None:
    """Every kept backup's whole chain is kept: nothing it restores from is pruned."""
    backups = chain(steps, running)
    decision = decide(make_spec(retention=retention), BASE, BASE, backups)
    kept, pruned = set(decision.kept), set(decision.prune)
    for name in kept:
        chain_of = ancestors(name, backups)
        assert set(chain_of) <= kept
        assert not set(chain_of) & pruned
    done = [b for b in backups if b.phase == "Completed"]
    if done:
        # The newest completed backup is always kept (every rule keeps at least one), so
        # the backup running on top of it keeps its parent.
        newest = max(done, key=lambda b: b.completed or b.created)
        assert newest.name in kept
        for name in ancestors("running", backups) if running else []:
            assert name not in pruned


@given(steps=STEPS, retention=RETENTION, running=st.booleans())
@settings(deadline=None)
def test_prune_and_kept_are_disjoint(
    steps: list[Step], retention: dict[str, int] | None, running: bool
) -> None:
    """No backup is both kept and pruned; only Completed/Failed ones not being deleted go."""
    backups = chain(steps, running)
    decision = decide(make_spec(retention=retention), BASE, BASE, backups)
    assert not set(decision.kept) & set(decision.prune)
    by_name = {b.name: b for b in backups}
    for name in decision.prune:
        assert by_name[name].phase in ("Completed", "Failed")
        assert not by_name[name].deleting
    completed = {b.name for b in backups if b.phase == "Completed"}
    assert completed <= set(decision.kept) | set(decision.prune)
    assert list(decision.prune) == sorted(decision.prune)
