"""The migration job's pure decisions: every outcome × cancel / timeout / post-copy."""

from __future__ import annotations

import itertools

import pytest

from virtfleet.api.migration import MigrationPhase, MigrationProgress
from virtfleet.api.virtualmachine import PrintableStatus
from virtfleet.domain.jobs import JobProgress, JobType, parse_job_stats
from virtfleet.reconcile.migration_job import (
    POLL_SECONDS,
    RECOVERY_RETRY_SECONDS,
    EndReason,
    Fail,
    HandOver,
    JobOutcome,
    JobState,
    OfflineStop,
    Recover,
    decide_job_end,
    decide_job_error,
    decide_offline_stop,
    decide_poll,
    decide_recovery,
    is_postcopy_failure,
    poll_interval,
    should_abort,
)

FLAGS = list(itertools.product([False, True], repeat=3))  # cancelled, timed out, post-copied


def state(cancelled: bool, timed_out: bool, post_copied: bool) -> JobState:
    return JobState(
        cancelled=cancelled, timed_out_budget=12.5 if timed_out else None, post_copied=post_copied
    )


@pytest.mark.parametrize(("cancelled", "timed_out", "post_copied"), FLAGS)
def test_a_success_hands_over_whatever_else_happened(
    cancelled: bool, timed_out: bool, post_copied: bool
) -> None:
    # The guest already runs on the target: a late cancel or abort changes nothing.
    end = decide_job_end(JobOutcome.SUCCEEDED, state(cancelled, timed_out, post_copied), None)
    assert end == HandOver()


@pytest.mark.parametrize("outcome", [JobOutcome.FAILED, JobOutcome.UNCLEAR])
@pytest.mark.parametrize(
    ("cancelled", "timed_out"), list(itertools.product([False, True], repeat=2))
)
def test_after_post_copy_any_other_outcome_loses_the_guest(
    outcome: JobOutcome, cancelled: bool, timed_out: bool
) -> None:
    end = decide_job_end(outcome, state(cancelled, timed_out, True), "broken pipe")
    assert isinstance(end, Fail)
    assert end.reason is EndReason.POSTCOPY_FAILED
    assert "guest is lost" in end.message
    assert "broken pipe" in end.message
    # Never resumed or restarted anywhere: the VM is marked Failed, not released.
    assert (end.release_vm, end.vm_printable) == (False, PrintableStatus.FAILED)
    assert end.phase is MigrationPhase.FAILED


@pytest.mark.parametrize(
    ("cancelled", "timed_out"), list(itertools.product([False, True], repeat=2))
)
def test_an_unclear_outcome_is_left_to_the_recovery(cancelled: bool, timed_out: bool) -> None:
    end = decide_job_end(JobOutcome.UNCLEAR, state(cancelled, timed_out, False), "lost")
    assert end == Recover()


@pytest.mark.parametrize(
    ("cancelled", "timed_out"), list(itertools.product([False, True], repeat=2))
)
def test_a_split_fails_like_a_failure_and_removes_the_targets_copy_first(
    cancelled: bool, timed_out: bool
) -> None:
    """Found by chaos (seed 1131364337): libvirt resumed the source after its Finish3
    call was lost, and the target kept the vCPUs it had started: both ran for good."""
    flags = state(cancelled, timed_out, False)
    failed = decide_job_end(JobOutcome.FAILED, flags, "Finish3 lost", timeout_per_gib=3)
    split = decide_job_end(JobOutcome.SPLIT, flags, "Finish3 lost", timeout_per_gib=3)
    assert isinstance(failed, Fail)
    assert isinstance(split, Fail)
    assert (split.reason, split.phase, split.release_vm) == (
        failed.reason,
        failed.phase,
        failed.release_vm,
    )
    assert split.remove_target_copy
    assert not failed.remove_target_copy
    assert split.message.startswith(failed.message)
    assert "the target's copy was destroyed" in split.message


def test_a_split_after_post_copy_is_still_a_lost_guest() -> None:
    end = decide_job_end(JobOutcome.SPLIT, state(False, False, True), "broken pipe")
    assert isinstance(end, Fail)
    assert end.reason is EndReason.POSTCOPY_FAILED
    assert not end.remove_target_copy


@pytest.mark.parametrize("timed_out", [False, True])
def test_a_cancelled_job_that_failed_is_cancelled(timed_out: bool) -> None:
    end = decide_job_end(JobOutcome.FAILED, state(True, timed_out, False), "aborted")
    assert end == Fail(EndReason.CANCELLED, "deleted while running", phase=MigrationPhase.CANCELLED)
    assert end.release_vm


def test_a_timed_out_job_names_its_budget_and_the_policy() -> None:
    end = decide_job_end(JobOutcome.FAILED, state(False, True, False), "aborted", timeout_per_gib=3)
    assert isinstance(end, Fail)
    assert end.reason is EndReason.COMPLETION_TIMEOUT
    assert "12.50s" in end.message
    assert "3s per GiB" in end.message
    assert end.release_vm
    assert end.phase is MigrationPhase.FAILED


def test_a_plain_failure_carries_libvirts_error_or_a_default() -> None:
    end = decide_job_end(JobOutcome.FAILED, JobState(), "unable to connect")
    assert end == Fail(EndReason.MIGRATION_FAILED, "unable to connect")
    assert decide_job_end(JobOutcome.FAILED, JobState(), None) == Fail(
        EndReason.MIGRATION_FAILED, "the job ended; VM stays"
    )


def test_a_libvirt_error_before_the_job_means_the_target_is_unavailable() -> None:
    assert decide_job_error("no route", job_began=False) == Fail(
        EndReason.TARGET_UNAVAILABLE, "no route"
    )
    # Once the job began it may have finished: never called failed blindly.
    assert decide_job_error("not connected", job_began=True) == Recover()


def test_the_recovery_decides_by_the_outcome() -> None:
    assert decide_recovery(JobOutcome.SUCCEEDED) == HandOver()
    failed = decide_recovery(JobOutcome.FAILED)
    assert isinstance(failed, Fail)
    assert failed.reason is EndReason.INTERRUPTED
    assert failed.release_vm
    assert decide_recovery(JobOutcome.UNCLEAR) == Recover(delay=RECOVERY_RETRY_SECONDS)
    split = decide_recovery(JobOutcome.SPLIT)
    assert isinstance(split, Fail)
    assert (split.reason, split.remove_target_copy, split.release_vm) == (
        EndReason.INTERRUPTED,
        True,
        True,
    )


def test_an_offline_job_that_stopped_early_keeps_the_vm_on_the_source() -> None:
    cancelled = decide_offline_stop(OfflineStop.CANCELLED, "")
    assert (cancelled.reason, cancelled.phase) == (EndReason.CANCELLED, MigrationPhase.CANCELLED)
    refused = decide_offline_stop(OfflineStop.REFUSED, "disk gone", reason="VolumeMissing")
    assert (refused.reason, refused.message) == ("VolumeMissing", "disk gone")
    broken = decide_offline_stop(OfflineStop.HYPERVISOR_ERROR, "I/O error")
    assert broken.reason is EndReason.MIGRATION_FAILED
    assert broken.message == "I/O error; the VM stays on the source"
    assert all(f.release_vm for f in (cancelled, refused, broken))


def test_post_copy_failures_are_recognised_from_the_stored_reason() -> None:
    end = decide_job_end(JobOutcome.FAILED, JobState(post_copied=True), "x")
    assert isinstance(end, Fail)
    assert is_postcopy_failure(f"{end.reason}: {end.message}")
    assert not is_postcopy_failure("MigrationFailed: x")
    assert not is_postcopy_failure(None)


# --- polls -----------------------------------------------------------------------------


def sample(iteration: int, remaining: int, *, active: bool = True) -> JobProgress:
    stats = {
        "type": JobType.UNBOUNDED if active else JobType.NONE,
        "memory_iteration": iteration,
        "memory_remaining": remaining,
        "data_total": 1000,
        "data_processed": 1000 - remaining,
        "data_remaining": remaining,
    }
    return parse_job_stats(stats)


def test_the_timeout_aborts_once_libvirt_accepted() -> None:
    job = JobState()
    assert not should_abort(job, None, 1e9)  # no budget: never
    assert not should_abort(job, 10.0, 9.0)
    assert should_abort(job, 10.0, 11.0)
    job.aborted = True
    assert not should_abort(job, 10.0, 11.0)


def test_short_budgets_are_polled_more_often() -> None:
    assert poll_interval(None) == POLL_SECONDS
    assert poll_interval(0.5) == 0.25
    assert poll_interval(0.01) == 0.1
    assert poll_interval(60) == POLL_SECONDS


def test_an_inactive_sample_asks_for_nothing() -> None:
    decision = decide_poll(
        JobState(),
        sample(4, 500, active=False),
        post_copy_allowed=True,
        last_published=None,
        seconds_since_published=99,
    )
    assert (decision.start_post_copy, decision.publish) == (False, None)


def test_a_stalled_pre_copy_switches_to_post_copy_only_when_allowed() -> None:
    def run(allowed: bool, job: JobState) -> list[bool]:
        out = []
        for iteration in (1, 2, 3, 4):
            d = decide_poll(
                job,
                sample(iteration, 800),  # never shrinks: stalled
                post_copy_allowed=allowed,
                last_published=None,
                seconds_since_published=0,
            )
            out.append(d.start_post_copy)
        return out

    assert run(True, JobState()) == [False, False, False, True]
    assert run(False, JobState()) == [False] * 4
    assert run(True, JobState(post_copied=True)) == [False] * 4  # once is enough
    assert run(True, JobState(aborted=True)) == [False] * 4  # aborting: no switch


def test_progress_is_published_when_it_changed_and_not_too_often() -> None:
    job = JobState()
    first = decide_poll(
        job, sample(1, 600), post_copy_allowed=False, last_published=None, seconds_since_published=0
    )
    assert first.publish is not None
    assert first.publish.data_remaining_bytes == 600
    same = decide_poll(
        job,
        sample(1, 600),
        post_copy_allowed=False,
        last_published=first.publish,
        seconds_since_published=10,
    )
    assert same.publish is None
    soon = decide_poll(
        job,
        sample(1, 400),
        post_copy_allowed=False,
        last_published=first.publish,
        seconds_since_published=0.2,
    )
    assert soon.publish is None
    later = decide_poll(
        job,
        sample(1, 400),
        post_copy_allowed=False,
        last_published=first.publish,
        seconds_since_published=2,
    )
    assert isinstance(later.publish, MigrationProgress)
