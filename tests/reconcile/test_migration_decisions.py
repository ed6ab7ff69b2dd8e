"""Pure VMMigration decisions: scheduling refusals, one migration per VM, progress, outcome."""

from __future__ import annotations

from datetime import timedelta

from tests.controller.fleet_builders import GI, NOW, host, node, request

from virtfleet.api.migration import (
    MigrationMode,
    MigrationPhase,
    MigrationProgress,
    VMMigrationSpec,
    VMMigrationStatus,
)
from virtfleet.domain.jobs import JobType, parse_job_stats
from virtfleet.reconcile.migration import (
    MigrationRef,
    Refused,
    Scheduled,
    VmFacts,
    competing,
    decide_schedule,
    failed_status,
    running_status,
    scheduled_status,
    succeeded_status,
)
from virtfleet.reconcile.migration_job import (
    DomainWhere,
    handoff_printable,
    job_outcome,
    offline_outcome,
    postcopy_due,
    postcopy_failure_message,
    progress_of,
    should_publish,
)

HOSTS = {"a": host("a"), "b": host("b"), "c": host("c", memory_gi=0.5)}
NODES = {"a": node("a", pool="x"), "b": node("b", pool="x"), "c": node("c", pool="y")}


def spec(**kw: object) -> VMMigrationSpec:
    return VMMigrationSpec.model_validate({"vmName": "vm1", **kw})


def vm(node_name: str | None = "a", **selector: str) -> VmFacts:
    return VmFacts("vm1", node_name, request("1Gi", **selector))


def schedule(s: VMMigrationSpec, facts: VmFacts | None, ahead: list[str] | None = None) -> object:
    return decide_schedule(
        s, facts, ahead or [], {"a": GI}, HOSTS, NODES, now=NOW, heartbeat_timeout=40
    )


def test_target_given_and_fitting_is_scheduled() -> None:
    assert schedule(spec(targetNode="b"), vm()) == Scheduled("a", "b")


def test_no_target_picks_the_node_with_most_room_but_never_the_source() -> None:
    assert schedule(spec(), vm()) == Scheduled("a", "b")


def test_refusals_name_the_reason() -> None:
    cases = {
        "no-such": (spec(targetNode="zz"), vm(), "no such Node"),
        "itself": (spec(targetNode="a"), vm(), "already runs on a"),
        "small": (spec(targetNode="c"), vm(), "requested"),
        "selector": (spec(targetNode="c"), vm(pool="x"), "does not match nodeSelector pool=x"),
        "gone": (spec(targetNode="b"), None, "does not exist"),
        "unplaced": (spec(targetNode="b"), vm(None), "not placed"),
    }
    for case, (s, facts, text) in cases.items():
        outcome = schedule(s, facts)
        assert isinstance(outcome, Refused), case
        assert text in outcome.message, (case, outcome)


def test_offline_mode_is_scheduled_like_live() -> None:
    assert schedule(spec(mode="Offline", targetNode="b"), vm()) == Scheduled("a", "b")
    assert isinstance(schedule(spec(mode="Offline", targetNode="c"), vm()), Refused)


def test_offline_outcome_is_decided_by_where_the_definition_is() -> None:
    def where(on_s: bool, act_s: bool, on_t: bool, act_t: bool) -> str:
        return offline_outcome(DomainWhere(on_s, act_s, on_t, act_t))

    # Defined on the target (after every copy): done, even before the source undefine.
    assert where(False, False, True, False) == "succeeded"
    assert where(True, False, True, False) == "succeeded"
    assert where(False, False, True, True) == "succeeded"
    # Not (yet) defined there: the job stopped early, the VM stays here.
    assert where(True, False, False, False) == "failed"
    assert where(True, True, False, False) == "failed"
    # Nowhere, or running here while defined there: never guess.
    assert where(False, False, False, False) == "unclear"
    assert where(True, True, True, False) == "unclear"


def test_postcopy_waits_for_iterations_and_a_stall() -> None:
    mib = 2**20
    # Storage copy (iteration 0) and the first iterations never switch.
    assert not postcopy_due([(0, 128 * mib), (1, 128 * mib), (2, 40 * mib), (3, 40 * mib)])
    # Past iteration 3 with the dirty set still shrinking: pre-copy converges.
    converging = [(1, 128 * mib), (2, 60 * mib), (3, 30 * mib), (4, 10 * mib)]
    assert not postcopy_due(converging)
    # Past iteration 3, the start of the iteration not smaller than the previous: stall.
    stalled = [(1, 128 * mib), (2, 60 * mib), (3, 30 * mib), (3, 5 * mib), (4, 30 * mib)]
    assert postcopy_due(stalled)
    assert postcopy_due([*stalled, (4, 1 * mib)])  # later samples of the iteration: same start
    # Growing counts as stalled too; the threshold is a parameter.
    assert postcopy_due([(1, 10 * mib), (2, 20 * mib)], after_iteration=1)
    assert not postcopy_due([])
    assert not postcopy_due([(5, mib)])  # no earlier iteration seen: nothing to compare


def test_postcopy_failure_message_says_the_guest_is_lost() -> None:
    text = postcopy_failure_message("connection reset")
    assert "lost" in text
    assert "not restarted" in text
    assert "connection reset" in text


def test_postcopy_request_sets_the_libvirt_flag() -> None:
    import libvirt

    from virtfleet.hypervisor.migration import MigrationRequest, migration_flags

    plain = migration_flags(MigrationRequest(dest_uri="qemu+tcp://b/system"))
    assert not plain & libvirt.VIR_MIGRATE_POSTCOPY
    flags = migration_flags(MigrationRequest(dest_uri="qemu+tcp://b/system", post_copy=True))
    assert flags & libvirt.VIR_MIGRATE_POSTCOPY
    assert flags & libvirt.VIR_MIGRATE_LIVE


def test_post_copy_is_scheduled() -> None:
    assert schedule(spec(targetNode="b", policy={"postCopy": True}), vm()) == Scheduled("a", "b")


def test_handoff_printable_depends_on_the_mode() -> None:
    assert handoff_printable(MigrationMode.LIVE) == "Running"
    assert handoff_printable(MigrationMode.OFFLINE) == "Stopped"


def test_another_active_migration_refuses() -> None:
    outcome = schedule(spec(targetNode="b"), vm(), ["m0"])
    assert isinstance(outcome, Refused)
    assert outcome.reason == "MigrationInProgress"
    assert "m0" in outcome.message


def test_competing_oldest_unscheduled_wins_and_scheduled_always_wins() -> None:
    old = MigrationRef("m1", NOW, None)
    new = MigrationRef("m2", NOW + timedelta(seconds=1), None)
    done = MigrationRef("m0", NOW - timedelta(seconds=9), MigrationPhase.SUCCEEDED)
    assert competing(new, [old, new, done]) == ["m1"]
    assert competing(old, [old, new, done]) == []
    running_new = MigrationRef("m3", NOW + timedelta(seconds=5), MigrationPhase.RUNNING)
    assert competing(old, [old, running_new]) == ["m3"]


def test_status_transitions_keep_kstatus_conditions() -> None:
    st = scheduled_status(VMMigrationStatus(), 1, Scheduled("a", "b"), NOW)
    assert (st.phase, st.source_node, st.target_node) == (MigrationPhase.SCHEDULED, "a", "b")
    assert {c.type for c in st.conditions} == {"Ready", "Reconciling"}
    st = running_status(st, 1, NOW)
    assert st.phase is MigrationPhase.RUNNING
    assert st.start_time == "2026-01-01T12:00:00Z"
    done = succeeded_status(st, 1, 42, NOW)
    assert done.phase is MigrationPhase.SUCCEEDED
    assert done.downtime_ms == 42
    assert done.progress is not None
    assert done.progress.percent == 100
    assert [c.type for c in done.conditions] == ["Ready"]
    failed = failed_status(st, 1, "Nope", "because", NOW, phase=MigrationPhase.CANCELLED)
    assert failed.phase is MigrationPhase.CANCELLED
    assert failed.failure_reason == "Nope: because"
    assert {c.type for c in failed.conditions} == {"Ready", "Stalled"}


def test_progress_from_job_stats() -> None:
    job = parse_job_stats(
        {
            "type": JobType.UNBOUNDED,
            "data_total": 200,
            "data_processed": 50,
            "data_remaining": 150,
            "memory_dirty_rate": 10,
            "memory_page_size": 4096,
            "memory_iteration": 2,
        }
    )
    assert progress_of(job) == MigrationProgress(
        percent=25,
        data_total_bytes=200,
        data_processed_bytes=50,
        data_remaining_bytes=150,
        dirty_rate_bytes_per_second=40960,
        iteration=2,
    )


def test_progress_is_published_when_changed_and_not_too_often() -> None:
    a, b = MigrationProgress(percent=1), MigrationProgress(percent=2)
    assert should_publish(None, a, 0.0)
    assert not should_publish(a, a, 10.0)
    assert not should_publish(a, b, 0.5)
    assert should_publish(a, b, 1.5)


def test_outcome_is_decided_by_where_the_domain_runs() -> None:
    assert job_outcome(DomainWhere(False, False, True, True)) == "succeeded"
    assert job_outcome(DomainWhere(True, True, True, False)) == "failed"
    assert job_outcome(DomainWhere(True, True, False, False)) == "failed"
    assert job_outcome(DomainWhere(True, True, True, True)) == "unclear"
    assert job_outcome(DomainWhere(False, False, False, False)) == "unclear"


def test_a_source_left_paused_after_the_switch_over_is_a_success() -> None:
    """libvirtd killed between switch-over and confirmation leaves the source paused."""
    left_paused = DomainWhere(
        True, True, True, True, source_paused_by_migration=True, target_running=True
    )
    assert job_outcome(left_paused) == "succeeded"
    # The target still paused (incoming, or post-copy not started): nothing is settled.
    incoming = DomainWhere(
        True, True, True, True, source_paused_by_migration=True, target_running=False
    )
    assert job_outcome(incoming) == "unclear"
    # Paused for another reason (post-copy, a user): both copies may matter.
    assert job_outcome(DomainWhere(True, True, True, True, target_running=True)) == "unclear"


def test_vcpus_running_on_both_nodes_is_a_split() -> None:
    """Never a stage of a job: libvirt resumed the source while the target ran."""
    both = DomainWhere(True, True, True, True, target_running=True, source_running=True)
    assert job_outcome(both) == "split"
    # Once the hand-over committed the target, the source's copy is the left-over.
    assert job_outcome(both, handed_over=True) == "succeeded"
    # A target still paused (the job may run on): not a split.
    incoming = DomainWhere(True, True, True, True, source_running=True)
    assert job_outcome(incoming) == "unclear"
