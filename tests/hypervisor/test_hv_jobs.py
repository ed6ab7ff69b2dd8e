"""Parsing of ``jobStats()``/``jobInfo()`` into JobProgress (pure functions)."""

from __future__ import annotations

from typing import Any

import libvirt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtfleet.domain.jobs import (
    JobOperation,
    JobProgress,
    JobType,
    parse_job_info,
    parse_job_stats,
)

#: What QEMU reports in the middle of a live migration (values from a real run, trimmed).
MIGRATING: dict[str, Any] = {
    "type": 2,
    "operation": 5,
    "time_elapsed": 1830,
    "data_total": 138_219_520,
    "data_processed": 103_664_640,
    "data_remaining": 34_554_880,
    "memory_total": 138_219_520,
    "memory_processed": 103_664_640,
    "memory_remaining": 34_554_880,
    "memory_bps": 62_000_000,
    "memory_dirty_rate": 250,
    "memory_page_size": 4096,
    "memory_iteration": 2,
    "downtime": 300,
    "auto_converge_throttle": 20,
    "setup_time": 12,
}

COMPLETED: dict[str, Any] = {
    "type": 3,
    "operation": 5,
    "time_elapsed": 2950,
    "downtime": 41,
    "data_total": 138_219_520,
    "data_processed": 138_219_520,
    "data_remaining": 0,
}


def test_running_migration() -> None:
    job = parse_job_stats(MIGRATING)
    assert job.type is JobType.UNBOUNDED
    assert job.operation is JobOperation.MIGRATION_OUT
    assert job.active
    assert job.time_elapsed_ms == 1830
    assert (job.data_total, job.data_processed, job.data_remaining) == (
        138_219_520,
        103_664_640,
        34_554_880,
    )
    assert job.memory_iteration == 2
    assert job.downtime_ms == 300
    assert job.auto_converge_throttle == 20
    assert job.percent == 75.0
    assert job.dirty_rate_bytes_per_second == 250 * 4096


def test_completed_migration() -> None:
    job = parse_job_stats(COMPLETED)
    assert job.type is JobType.COMPLETED
    assert not job.active
    assert job.percent == 100.0
    assert job.downtime_ms == 41
    assert job.dirty_rate_bytes_per_second is None


def test_idle_domain_reports_none() -> None:
    job = parse_job_stats({"type": 0})
    assert job == JobProgress(type=JobType.NONE)
    assert job.percent is None
    assert not job.active


def test_failed_job_keeps_error_message() -> None:
    job = parse_job_stats({"type": 4, "errmsg": "migration was cancelled by peer"})
    assert job.type is JobType.FAILED
    assert job.error_message == "migration was cancelled by peer"


def test_event_parameters_take_type_from_caller() -> None:
    params = {k: v for k, v in COMPLETED.items() if k != "type"}
    assert parse_job_stats(params, job_type=3).type is JobType.COMPLETED


def test_unknown_and_malformed_values_do_not_break_the_poller() -> None:
    job = parse_job_stats(
        {"type": 99, "operation": "?", "data_total": "lots", "data_processed": -5, "new": 1}
    )
    assert job.type is JobType.NONE
    assert job.operation is JobOperation.UNKNOWN
    assert job.data_total == 0
    assert job.data_processed == 0


def test_percent_is_clamped() -> None:
    assert parse_job_stats({"type": 1, "data_total": 10, "data_processed": 30}).percent == 100.0


def test_legacy_job_info_list() -> None:
    job = parse_job_info([1, 500, 1000, 100, 40, 60, 90, 30, 60, 10, 10, 0])
    assert job.type is JobType.BOUNDED
    assert job.time_elapsed_ms == 500
    assert job.time_remaining_ms == 1000
    assert job.percent == 40.0
    assert (job.memory_total, job.memory_processed, job.memory_remaining) == (90, 30, 60)
    assert (job.disk_total, job.disk_processed, job.disk_remaining) == (10, 10, 0)


def test_legacy_job_info_short_list() -> None:
    assert parse_job_info([0]) == JobProgress(type=JobType.NONE)


def test_enums_match_libvirt() -> None:
    assert JobType.NONE == libvirt.VIR_DOMAIN_JOB_NONE
    assert JobType.BOUNDED == libvirt.VIR_DOMAIN_JOB_BOUNDED
    assert JobType.UNBOUNDED == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
    assert JobType.COMPLETED == libvirt.VIR_DOMAIN_JOB_COMPLETED
    assert JobType.FAILED == libvirt.VIR_DOMAIN_JOB_FAILED
    assert JobType.CANCELLED == libvirt.VIR_DOMAIN_JOB_CANCELLED
    assert JobOperation.MIGRATION_OUT == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    assert JobOperation.SNAPSHOT_REVERT == libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_REVERT
    assert JobOperation.SNAPSHOT_DELETE == libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_DELETE


# The machine is shared with builds; generation speed is not what this test is about.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from([*MIGRATING, "errmsg", "junk"]),
        st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats(allow_nan=True)),
        max_size=8,
    )
)
def test_parse_never_raises(stats: dict[str, Any]) -> None:
    job = parse_job_stats(stats)
    assert job.data_total >= 0
    assert job.percent is None or 0.0 <= job.percent <= 100.0
