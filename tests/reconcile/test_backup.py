"""The VMBackup policy as a pure function: every phase's branches, without libvirt or S3."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.api.backup import BackupMode, BackupPhase, BackupType, VMBackupSpec, VMBackupStatus
from virtfleet.reconcile.backup import (
    LOCATION_RETRY_SECONDS,
    MAX_ATTEMPTS,
    POOL_BUSY_RECHECK_SECONDS,
    RETRY_BASE_SECONDS,
    Action,
    BackupView,
    Claim,
    Complete,
    CopyVolumes,
    Fail,
    Nothing,
    Observed,
    Outcome,
    ParentCandidate,
    Recheck,
    ReportProgress,
    Retry,
    StartJob,
    StartUpload,
    Wait,
    checkpoint_name,
    choose_type,
    decide,
)

UID = "0b0b0b0b-0000-4000-8000-000000000001"
OWN = checkpoint_name(UID)
#: Newest first, as the agent lists them.
P_NEW = ParentCandidate(name="nightly-2", checkpoint="vf-p2", object_prefix="backups/ns/nightly-2/")
P_OLD = ParentCandidate(name="nightly-1", checkpoint="vf-p1", object_prefix="backups/ns/nightly-1/")

RUNNING = Observed(
    vm_uid="vm-uid",
    running=True,
    location_found=True,
    location_available=True,
    location_message="",
    checkpoints=(),
    job_active=False,
    job_outcome=None,
    job_error=None,
    scratch_present=False,
    upload_running=False,
    upload_outcome=None,
    upload_error=None,
)
STOPPED = replace(RUNNING, running=False)


def backup(
    phase: BackupPhase | None = None,
    *,
    mode: BackupMode = BackupMode.AUTO,
    type_: BackupType | None = None,
    parent: str | None = None,
    attempt: int | None = 1,
    deleting: bool = False,
    with_spec: bool = True,
    checkpoint: str | None = OWN,
) -> BackupView:
    """A backup of a running VM claims its own checkpoint; ``checkpoint=None``: a stopped
    VM's backup (its volumes are copied)."""
    spec = VMBackupSpec.model_validate({"vmName": "web", "location": "s3-main", "mode": mode})
    claimed = phase not in (None, BackupPhase.PENDING)
    status = VMBackupStatus.model_validate(
        {
            "phase": phase,
            "type": type_,
            "parent": parent,
            "attempt": attempt,
            "checkpoint": checkpoint if claimed else None,
        }
    )
    return BackupView(
        name="b",
        namespace="ns",
        uid=UID,
        spec=spec if with_spec else None,
        status=status,
        deleting=deleting,
    )


def in_progress(
    type_: BackupType = BackupType.FULL,
    parent: str | None = None,
    attempt: int | None = 1,
    checkpoint: str | None = OWN,
) -> BackupView:
    return backup(
        BackupPhase.IN_PROGRESS, type_=type_, parent=parent, attempt=attempt, checkpoint=checkpoint
    )


def uploading(
    type_: BackupType = BackupType.FULL,
    parent: str | None = None,
    attempt: int | None = 1,
    checkpoint: str | None = OWN,
) -> BackupView:
    return backup(
        BackupPhase.UPLOADING, type_=type_, parent=parent, attempt=attempt, checkpoint=checkpoint
    )


def test_checkpoint_name_is_derived_from_the_uid() -> None:
    """A restarted agent finds the checkpoint again from the backup's uid alone."""
    assert checkpoint_name("abc") == "vf-abc"


# --- nothing to do ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [BackupPhase.COMPLETED, BackupPhase.FAILED])
def test_terminal_phases_do_nothing(phase: BackupPhase) -> None:
    """A finished backup is never touched again, whatever the agent still remembers."""
    seen = replace(
        RUNNING, upload_outcome=Outcome.SUCCEEDED, scratch_present=True, checkpoints=(OWN,)
    )
    assert decide(backup(phase), seen) == Nothing()


@pytest.mark.parametrize("phase", [None, BackupPhase.IN_PROGRESS, BackupPhase.UPLOADING])
def test_a_deleting_backup_is_left_to_the_finalizer(phase: BackupPhase | None) -> None:
    """Deletion is handled elsewhere (abandon): decide must not start work on it."""
    seen = replace(RUNNING, job_outcome=Outcome.SUCCEEDED, scratch_present=True)
    assert decide(backup(phase, deleting=True), seen) == Nothing()


def test_a_backup_without_a_spec_does_nothing() -> None:
    """An object whose spec did not parse gives nothing to act on."""
    seen = replace(RUNNING, job_outcome=Outcome.SUCCEEDED, scratch_present=True)
    assert decide(backup(BackupPhase.IN_PROGRESS, with_spec=False), seen) == Nothing()


# --- Pending -----------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [None, BackupPhase.PENDING])
def test_pending_waits_for_a_missing_location(phase: BackupPhase | None) -> None:
    """A location that does not exist (yet) is waited for, not a failure; checked before the VM."""
    action = decide(backup(phase), replace(STOPPED, location_found=False))
    assert isinstance(action, Wait)
    assert action.seconds == LOCATION_RETRY_SECONDS
    assert action.reason == "LocationNotFound"
    assert "s3-main" in action.message


def test_pending_waits_for_an_unavailable_location_with_its_reason() -> None:
    """The location's own message is passed on, so the user sees why."""
    seen = replace(RUNNING, location_available=False, location_message="bucket gone")
    action = decide(backup(), seen)
    assert isinstance(action, Wait)
    assert action.reason == "LocationUnavailable"
    assert action.seconds == LOCATION_RETRY_SECONDS
    assert "bucket gone" in action.message


def test_an_unchecked_location_says_so() -> None:
    """An empty message means the controller has not checked the location yet."""
    action = decide(backup(), replace(RUNNING, location_available=False))
    assert isinstance(action, Wait)
    assert "not checked yet" in action.message


def test_a_stopped_vm_is_claimed_full_without_a_checkpoint() -> None:
    """A stopped VM is backed up from its volumes: always full, no job, no checkpoint, even
    when an earlier backup's checkpoint could serve (its disks do not change while stopped)."""
    seen = replace(STOPPED, checkpoints=("vf-p2",), parents=(P_NEW,))
    action = decide(backup(), seen)
    assert action == Claim(type=BackupType.FULL, parent=None, checkpoint=None)


def test_an_incremental_of_a_stopped_vm_fails_with_what_to_use() -> None:
    """Incremental needs a job on a running domain; say which modes work."""
    action = decide(backup(mode=BackupMode.INCREMENTAL), STOPPED)
    assert isinstance(action, Fail)
    assert action.reason == "VMNotRunning"
    assert "Auto or Full" in action.message
    assert action.drop_checkpoint is None


def test_a_vm_without_a_domain_fails() -> None:
    """No domain on the node: no volumes known, nothing to copy."""
    action = decide(backup(), replace(STOPPED, defined=False))
    assert isinstance(action, Fail)
    assert action.reason == "VMNotDefined"
    assert "web" in action.message


def test_a_stopped_vms_backup_copies_its_volumes() -> None:
    """Claimed without a checkpoint, nothing copied yet: copy (under the VM's lock)."""
    assert decide(in_progress(checkpoint=None), STOPPED) == CopyVolumes()


def test_copied_volumes_are_uploaded_even_if_the_vm_started_since() -> None:
    """The copy is a consistent image of the stopped disks: the VM may run meanwhile."""
    seen = replace(RUNNING, job_outcome=Outcome.SUCCEEDED, scratch_present=True)
    assert decide(in_progress(checkpoint=None), seen) == StartUpload()


def test_a_vm_started_before_its_volumes_were_copied_fails() -> None:
    """A running VM's disks change: copying them is not a backup; say what to do."""
    action = decide(in_progress(checkpoint=None), RUNNING)
    assert isinstance(action, Fail)
    assert action.reason == "VMStarted"
    assert action.drop_checkpoint is None


@pytest.mark.parametrize(
    ("outcome", "scratch"), [(Outcome.FAILED, False), (None, True), (Outcome.FAILED, True)]
)
def test_a_failed_or_interrupted_copy_is_retried(outcome: Outcome | None, scratch: bool) -> None:
    """A copy that failed, or one a crash interrupted (its file left), goes again, clean."""
    seen = replace(STOPPED, job_outcome=outcome, job_error="ENOSPC", scratch_present=scratch)
    action = decide(in_progress(checkpoint=None), seen)
    assert isinstance(action, Retry)
    assert action.phase == BackupPhase.IN_PROGRESS
    assert action.drop_checkpoint is None


def test_a_copy_failing_every_attempt_fails() -> None:
    seen = replace(STOPPED, job_outcome=Outcome.FAILED, job_error="No space left on device")
    action = decide(in_progress(checkpoint=None, attempt=MAX_ATTEMPTS), seen)
    assert isinstance(action, Fail)
    assert action.reason == "BackupFailed"
    assert "No space left" in action.message


def test_a_stopped_vms_upload_without_scratch_copies_again() -> None:
    """The upload lost its files: back to the copy, which needs no running domain."""
    seen = replace(STOPPED, upload_outcome=Outcome.FAILED, upload_error="boom")
    action = decide(uploading(checkpoint=None), seen)
    assert action == Retry(phase=BackupPhase.IN_PROGRESS, message="boom", drop_checkpoint=None)


def test_a_stopped_vms_completed_upload_drops_no_checkpoint() -> None:
    seen = replace(STOPPED, upload_outcome=Outcome.SUCCEEDED, checkpoints=("vf-p2",))
    assert decide(uploading(checkpoint=None), seen) == Complete(drop_checkpoint=None)


def test_full_mode_claims_a_full_backup_even_with_a_usable_parent() -> None:
    """Full means all data, whatever checkpoints exist."""
    seen = replace(RUNNING, checkpoints=("vf-p2",), parents=(P_NEW,))
    action = decide(backup(mode=BackupMode.FULL), seen)
    assert action == Claim(type=BackupType.FULL, parent=None, checkpoint=OWN)


@pytest.mark.parametrize("mode", [BackupMode.AUTO, BackupMode.INCREMENTAL])
def test_incremental_builds_on_the_newest_parent_with_a_checkpoint(mode: BackupMode) -> None:
    """The newest completed backup whose checkpoint the domain still has is the parent."""
    seen = replace(RUNNING, checkpoints=("vf-p1", "vf-p2"), parents=(P_NEW, P_OLD))
    action = decide(backup(mode=mode), seen)
    assert action == Claim(type=BackupType.INCREMENTAL, parent=P_NEW, checkpoint=OWN)


def test_a_parent_whose_checkpoint_is_gone_is_skipped() -> None:
    """A newer backup without its checkpoint cannot be built on; an older one with it can."""
    seen = replace(RUNNING, checkpoints=("vf-p1",), parents=(P_NEW, P_OLD))
    action = decide(backup(mode=BackupMode.AUTO), seen)
    assert action == Claim(type=BackupType.INCREMENTAL, parent=P_OLD, checkpoint=OWN)


def test_auto_without_a_checkpoint_falls_back_to_full() -> None:
    """Auto never fails for lack of a chain: it takes a full backup."""
    no_cp = ParentCandidate(name="legacy", checkpoint=None, object_prefix=None)
    seen = replace(RUNNING, checkpoints=("vf-unrelated",), parents=(P_NEW, no_cp))
    action = decide(backup(mode=BackupMode.AUTO), seen)
    assert action == Claim(type=BackupType.FULL, parent=None, checkpoint=OWN)


def test_incremental_without_a_checkpoint_fails() -> None:
    """Incremental was asked for explicitly: no silent full backup instead."""
    seen = replace(RUNNING, checkpoints=(), parents=(P_NEW,))
    action = decide(backup(mode=BackupMode.INCREMENTAL), seen)
    assert isinstance(action, Fail)
    assert action.reason == "NoCheckpoint"
    assert action.drop_checkpoint is None


def test_choose_type_full_ignores_parents() -> None:
    """Full mode does not even look at the candidates."""
    assert choose_type(BackupMode.FULL, ("vf-p2",), (P_NEW,)) == (BackupType.FULL, None)


@given(
    mode=st.sampled_from(list(BackupMode)),
    checkpoints=st.lists(st.sampled_from(["vf-p1", "vf-p2", "vf-p3", "vf-x"]), unique=True),
    parents=st.lists(
        st.builds(
            ParentCandidate,
            name=st.sampled_from(["a", "b", "c"]),
            checkpoint=st.none() | st.sampled_from(["vf-p1", "vf-p2", "vf-p3"]),
            object_prefix=st.none(),
        ),
        max_size=4,
    ),
)
def test_choose_type_picks_the_first_usable_parent(
    mode: BackupMode, checkpoints: list[str], parents: list[ParentCandidate]
) -> None:
    """Incremental iff a parent's checkpoint exists, and then the first (newest) such one."""
    usable = [p for p in parents if p.checkpoint in checkpoints]
    chosen = choose_type(mode, checkpoints, parents)
    if mode == BackupMode.FULL:
        assert chosen == (BackupType.FULL, None)
    elif usable:
        assert chosen == (BackupType.INCREMENTAL, usable[0])
    elif mode == BackupMode.INCREMENTAL:
        assert isinstance(chosen, Fail)
        assert chosen.reason == "NoCheckpoint"
    else:
        assert chosen == (BackupType.FULL, None)


# --- InProgress --------------------------------------------------------------------------------


def test_a_running_job_reports_progress() -> None:
    """While libvirt's job runs, only progress is written."""
    seen = replace(RUNNING, job_active=True, checkpoints=(OWN,), scratch_present=True)
    assert decide(in_progress(), seen) == ReportProgress()


def test_a_succeeded_job_starts_the_upload() -> None:
    """The scratch files hold the data: stream them to the bucket."""
    seen = replace(RUNNING, job_outcome=Outcome.SUCCEEDED, scratch_present=True)
    assert decide(in_progress(), seen) == StartUpload()


def test_a_failed_job_retries_and_drops_its_own_checkpoint() -> None:
    """The failed attempt's checkpoint would break the chain: it goes, the parent's stays."""
    seen = replace(
        RUNNING,
        job_outcome=Outcome.FAILED,
        job_error="disk full",
        checkpoints=("vf-p2", OWN),
        parents=(P_NEW,),
    )
    action = decide(in_progress(BackupType.INCREMENTAL, "nightly-2"), seen)
    assert action == Retry(phase=BackupPhase.IN_PROGRESS, message="disk full", drop_checkpoint=OWN)


def test_a_failed_job_without_a_checkpoint_drops_nothing() -> None:
    """Nothing to delete when the job failed before libvirt made the checkpoint."""
    seen = replace(RUNNING, job_outcome=Outcome.FAILED, checkpoints=("vf-p2",))
    action = decide(in_progress(), seen)
    assert isinstance(action, Retry)
    assert action.drop_checkpoint is None
    assert action.message == "the backup job was interrupted"


@pytest.mark.parametrize(
    ("scratch", "checkpoints", "drop"),
    [(True, (), None), (False, (OWN,), OWN), (True, (OWN,), OWN)],
    ids=["scratch-left", "checkpoint-left", "both-left"],
)
def test_an_interrupted_attempt_is_retried(
    scratch: bool, checkpoints: tuple[str, ...], drop: str | None
) -> None:
    """An agent restart forgets the job: what the attempt left means it ran, so go again."""
    seen = replace(RUNNING, scratch_present=scratch, checkpoints=checkpoints)
    action = decide(in_progress(), seen)
    assert action == Retry(
        phase=BackupPhase.IN_PROGRESS,
        message="the backup job was interrupted",
        drop_checkpoint=drop,
    )


@pytest.mark.parametrize("attempt", [None, 0, *range(1, MAX_ATTEMPTS)])
def test_attempts_below_the_limit_retry(attempt: int | None) -> None:
    """Every attempt before the last one is retried."""
    seen = replace(RUNNING, job_outcome=Outcome.FAILED, checkpoints=(OWN,))
    assert isinstance(decide(in_progress(attempt=attempt), seen), Retry)


@pytest.mark.parametrize(
    ("attempt", "delay"),
    [(None, RETRY_BASE_SECONDS), (0, RETRY_BASE_SECONDS), (1, RETRY_BASE_SECONDS)]
    + [(n, RETRY_BASE_SECONDS * 2 ** (n - 1)) for n in range(2, MAX_ATTEMPTS)],
)
def test_retries_back_off_exponentially(attempt: int | None, delay: float) -> None:
    """A store or libvirtd coming back needs time: each retry waits twice the last."""
    seen = replace(RUNNING, job_outcome=Outcome.FAILED, checkpoints=(OWN,))
    action = decide(in_progress(attempt=attempt), seen)
    assert isinstance(action, Retry)
    assert action.delay == pytest.approx(delay)


@pytest.mark.parametrize("attempt", [MAX_ATTEMPTS, MAX_ATTEMPTS + 1])
def test_the_last_attempt_fails_and_drops_its_checkpoint(attempt: int) -> None:
    """After MAX_ATTEMPTS the backup fails for good, leaving no checkpoint of its own."""
    seen = replace(RUNNING, job_outcome=Outcome.FAILED, job_error="EIO", checkpoints=(OWN, "x"))
    action = decide(in_progress(attempt=attempt), seen)
    assert isinstance(action, Fail)
    assert action.reason == "BackupFailed"
    assert action.drop_checkpoint == OWN
    assert f"attempt {attempt} of {MAX_ATTEMPTS}" in action.message
    assert "EIO" in action.message


def test_a_failed_job_on_a_stopped_vm_fails() -> None:
    """Retrying the job is pointless when the VM stopped: it needs a running domain."""
    seen = replace(STOPPED, job_outcome=Outcome.FAILED, checkpoints=(OWN,))
    action = decide(in_progress(), seen)
    assert isinstance(action, Fail)
    assert action.reason == "VMNotRunning"
    assert action.drop_checkpoint == OWN


def test_a_vm_stopped_before_the_job_began_fails() -> None:
    """No job, nothing left, and no running domain: the backup cannot start."""
    action = decide(in_progress(), STOPPED)
    assert isinstance(action, Fail)
    assert action.reason == "VMNotRunning"
    assert action.drop_checkpoint in (None, OWN)


def test_a_full_job_drops_every_checkpoint_first() -> None:
    """A full backup keeps no parent: every checkpoint on the domain is stale (sorted)."""
    seen = replace(RUNNING, checkpoints=("vf-p2", "vf-a", "vf-p1"), parents=(P_NEW, P_OLD))
    action = decide(in_progress(BackupType.FULL), seen)
    assert action == StartJob(
        incremental_from=None,
        checkpoint=OWN,
        stale_checkpoints=("vf-a", "vf-p1", "vf-p2"),
    )


def test_an_incremental_job_keeps_only_its_parents_checkpoint() -> None:
    """The job starts from the parent's checkpoint; any other checkpoint is stale."""
    seen = replace(RUNNING, checkpoints=("vf-p1", "vf-p2", "vf-z"), parents=(P_NEW, P_OLD))
    action = decide(in_progress(BackupType.INCREMENTAL, "nightly-2"), seen)
    assert action == StartJob(
        incremental_from="vf-p2", checkpoint=OWN, stale_checkpoints=("vf-p1", "vf-z")
    )


@pytest.mark.parametrize(
    "seen",
    [
        replace(RUNNING, checkpoints=("vf-p1",), parents=(P_NEW, P_OLD)),
        replace(RUNNING, checkpoints=("vf-p2",), parents=(P_OLD,)),
        replace(
            RUNNING,
            checkpoints=("vf-p2",),
            parents=(ParentCandidate("nightly-2", None, None),),
        ),
    ],
    ids=["checkpoint-gone", "parent-gone", "parent-without-checkpoint"],
)
def test_an_incremental_whose_parent_checkpoint_vanished_fails(seen: Observed) -> None:
    """Between claim and job start the chain broke (migration, revert): no wrong delta."""
    action = decide(in_progress(BackupType.INCREMENTAL, "nightly-2"), seen)
    assert isinstance(action, Fail)
    assert action.reason == "ParentCheckpointGone"
    assert "nightly-2" in action.message
    assert action.drop_checkpoint is None


@pytest.mark.parametrize("attempt", [1, MAX_ATTEMPTS])
def test_a_succeeded_job_whose_scratch_files_vanished_counts_an_attempt(attempt: int) -> None:
    """Losing the attempt's data is a failed attempt: Retry (counted) or Fail, never a free
    new job; otherwise MAX_ATTEMPTS does not bound how often the job runs."""
    seen = replace(
        RUNNING, job_outcome=Outcome.SUCCEEDED, scratch_present=False, checkpoints=(OWN,)
    )
    action = decide(in_progress(attempt=attempt), seen)
    assert isinstance(action, Retry | Fail)
    if attempt >= MAX_ATTEMPTS:
        assert isinstance(action, Fail)


def test_a_vm_without_writable_disks_is_refused_at_once() -> None:
    """Nothing to copy: say so instead of starting a job libvirt would refuse."""
    action = decide(backup(), replace(RUNNING, has_disks=False))
    assert isinstance(action, Fail)
    assert action.reason == "NoDisks"


# --- Uploading ---------------------------------------------------------------------------------


def test_a_running_upload_reports_progress() -> None:
    """While the upload task runs, only progress is written."""
    seen = replace(RUNNING, upload_running=True, scratch_present=True)
    assert decide(uploading(), seen) == ReportProgress()


def test_a_finished_upload_completes_and_drops_the_parents_checkpoint() -> None:
    """One checkpoint per VM: the new backup's replaces its parent's."""
    seen = replace(
        RUNNING,
        upload_outcome=Outcome.SUCCEEDED,
        checkpoints=("vf-p2", OWN),
        parents=(P_NEW, P_OLD),
    )
    action = decide(uploading(BackupType.INCREMENTAL, "nightly-2"), seen)
    assert action == Complete(drop_checkpoint="vf-p2")


@pytest.mark.parametrize(
    ("view", "seen"),
    [
        (
            uploading(BackupType.FULL, None),
            replace(RUNNING, checkpoints=("vf-p2", OWN), parents=(P_NEW,)),
        ),
        (
            uploading(BackupType.INCREMENTAL, "nightly-2"),
            replace(RUNNING, checkpoints=(OWN,), parents=(P_NEW,)),
        ),
        (
            uploading(BackupType.INCREMENTAL, "nightly-2"),
            replace(RUNNING, checkpoints=("vf-p2", OWN), parents=(P_OLD,)),
        ),
    ],
    ids=["full", "parent-checkpoint-gone", "parent-not-listed"],
)
def test_completing_drops_nothing_without_a_present_parent_checkpoint(
    view: BackupView, seen: Observed
) -> None:
    """Only the parent's checkpoint, and only if the domain still has it; never our own."""
    action = decide(view, replace(seen, upload_outcome=Outcome.SUCCEEDED))
    assert action == Complete(drop_checkpoint=None)


def test_a_failed_upload_with_scratch_retries_the_upload_only() -> None:
    """The scratch files still hold the data the checkpoint marks: keep both, upload again."""
    seen = replace(
        RUNNING,
        upload_outcome=Outcome.FAILED,
        upload_error="503 SlowDown",
        scratch_present=True,
        checkpoints=(OWN,),
    )
    action = decide(uploading(), seen)
    assert action == Retry(
        phase=BackupPhase.UPLOADING, message="503 SlowDown", drop_checkpoint=None
    )


def test_an_upload_retry_does_not_need_a_running_vm() -> None:
    """Uploading reads scratch files, not the domain: a stopped VM is no reason to fail."""
    seen = replace(STOPPED, upload_outcome=Outcome.FAILED, scratch_present=True)
    action = decide(uploading(), seen)
    assert isinstance(action, Retry)
    assert action.phase == BackupPhase.UPLOADING
    assert action.message == "the upload failed"


def test_a_failed_upload_without_scratch_goes_back_to_the_job() -> None:
    """Without the data the job must run again, from scratch: its checkpoint goes."""
    seen = replace(
        RUNNING, upload_outcome=Outcome.FAILED, upload_error="boom", checkpoints=(OWN, "vf-p2")
    )
    action = decide(uploading(), seen)
    assert action == Retry(phase=BackupPhase.IN_PROGRESS, message="boom", drop_checkpoint=OWN)


def test_a_failed_upload_without_scratch_on_a_stopped_vm_fails() -> None:
    """Going back to the job needs the VM running."""
    seen = replace(STOPPED, upload_outcome=Outcome.FAILED)
    action = decide(uploading(), seen)
    assert isinstance(action, Fail)
    assert action.reason == "VMNotRunning"


def test_an_upload_the_agent_forgot_starts_again() -> None:
    """After an agent restart the scratch files are still there: upload them again."""
    seen = replace(RUNNING, scratch_present=True, checkpoints=(OWN,))
    assert decide(uploading(), seen) == StartUpload()


def test_an_upload_whose_scratch_files_are_gone_goes_back_to_the_job() -> None:
    """No data left to upload: retry from the job, dropping the attempt's checkpoint."""
    seen = replace(RUNNING, checkpoints=(OWN,))
    action = decide(uploading(), seen)
    assert action == Retry(
        phase=BackupPhase.IN_PROGRESS,
        message="the backup's scratch files are gone",
        drop_checkpoint=OWN,
    )


def test_the_last_upload_attempt_fails_and_drops_the_checkpoint() -> None:
    """Even with scratch left, a backup out of attempts fails and leaves no checkpoint."""
    seen = replace(RUNNING, upload_outcome=Outcome.FAILED, scratch_present=True, checkpoints=(OWN,))
    action = decide(uploading(attempt=MAX_ATTEMPTS), seen)
    assert isinstance(action, Fail)
    assert action.reason == "BackupFailed"
    assert action.drop_checkpoint == OWN


# --- properties over every phase -----------------------------------------------------------------

CHECKPOINTS = ["vf-p1", "vf-p2", "vf-p3", "vf-other"]
parents_st = st.lists(
    st.builds(
        ParentCandidate,
        name=st.sampled_from(["nightly-1", "nightly-2", "nightly-3"]),
        checkpoint=st.none() | st.sampled_from(CHECKPOINTS),
        object_prefix=st.none(),
    ),
    max_size=3,
)
views = st.builds(
    backup,
    st.none() | st.sampled_from(list(BackupPhase)),
    mode=st.sampled_from(list(BackupMode)),
    type_=st.none() | st.sampled_from(list(BackupType)),
    parent=st.none() | st.sampled_from(["nightly-1", "nightly-2", "nightly-3"]),
    attempt=st.none() | st.integers(0, MAX_ATTEMPTS + 1),
    deleting=st.booleans(),
)
outcomes = st.none() | st.sampled_from(list(Outcome))
observations = st.builds(
    Observed,
    vm_uid=st.just("vm-uid"),
    running=st.booleans(),
    location_found=st.booleans(),
    location_available=st.booleans(),
    location_message=st.sampled_from(["", "unreachable"]),
    checkpoints=st.lists(st.sampled_from([*CHECKPOINTS, OWN]), unique=True).map(tuple),
    job_active=st.booleans(),
    job_outcome=outcomes,
    job_error=st.none() | st.just("job error"),
    scratch_present=st.booleans(),
    upload_running=st.booleans(),
    upload_outcome=outcomes,
    upload_error=st.none() | st.just("upload error"),
    parents=parents_st,
)


@given(views, observations)
def test_a_job_never_deletes_the_checkpoint_it_starts_from(
    view: BackupView, seen: Observed
) -> None:
    """The incremental's base is kept; only checkpoints the domain has are deleted."""
    action = decide(view, seen)
    if isinstance(action, StartJob):
        assert action.checkpoint == OWN
        assert action.incremental_from not in action.stale_checkpoints
        assert set(action.stale_checkpoints) <= set(seen.checkpoints)
        if action.incremental_from is not None:
            assert action.incremental_from in seen.checkpoints
            assert view.status.type == BackupType.INCREMENTAL


@given(views, observations)
def test_retry_and_fail_only_drop_the_backups_own_checkpoint(
    view: BackupView, seen: Observed
) -> None:
    """A failed attempt must never break another backup's chain."""
    action = decide(view, seen)
    if isinstance(action, Retry | Fail):
        assert action.drop_checkpoint in (None, OWN)
    if isinstance(action, Retry):
        assert (view.status.attempt or 0) < MAX_ATTEMPTS
        assert action.delay >= RETRY_BASE_SECONDS
        if action.phase == BackupPhase.UPLOADING:
            assert action.drop_checkpoint is None


@given(views, observations)
def test_completing_never_drops_the_new_checkpoint(view: BackupView, seen: Observed) -> None:
    """The completed backup's checkpoint is the next incremental's base."""
    action: Action = decide(view, seen)
    if isinstance(action, Complete):
        assert action.drop_checkpoint != OWN
        assert action.drop_checkpoint is None or action.drop_checkpoint in seen.checkpoints


@given(views, observations)
def test_finished_or_deleting_backups_get_nothing(view: BackupView, seen: Observed) -> None:
    """No action on a backup that is gone or done."""
    if view.deleting or view.status.phase in (BackupPhase.COMPLETED, BackupPhase.FAILED):
        assert decide(view, seen) == Nothing()


@pytest.mark.parametrize("phase", [BackupPhase.IN_PROGRESS, BackupPhase.UPLOADING])
def test_a_busy_pool_is_looked_at_again_not_taken_for_lost_files(phase: BackupPhase) -> None:
    """A pool libvirt would not refresh (a long copy in it) does not know QEMU's new files:
    no attempt is spent on "the files are gone"."""
    seen = replace(RUNNING, job_outcome=Outcome.SUCCEEDED, pool_busy=True, checkpoints=(OWN,))
    assert decide(backup(phase, type_=BackupType.FULL), seen) == Recheck(POOL_BUSY_RECHECK_SECONDS)
    # Once the pool answers, a missing file is a missing file.
    assert isinstance(decide(in_progress(), replace(seen, pool_busy=False)), Retry)


@pytest.mark.parametrize("phase", [BackupPhase.IN_PROGRESS, BackupPhase.UPLOADING])
def test_a_retry_waits_out_its_back_off_whatever_wakes_it(phase: BackupPhase) -> None:
    """The retry's own status write comes back as a watch event at once: not a start."""
    seen = replace(RUNNING, retry_in=4.5, scratch_present=True)
    assert decide(backup(phase, type_=BackupType.FULL), seen) == Recheck(4.5)


def test_a_name_the_bucket_already_holds_is_never_overwritten() -> None:
    """A retained backup (or another cluster's) under the same name stays: Failed, why."""
    action = decide(backup(), replace(RUNNING, prefix_taken=True))
    assert isinstance(action, Fail)
    assert action.reason == "BackupExists"
    assert "another name" in action.message


def test_a_store_that_cannot_say_whether_the_name_is_taken_is_waited_for() -> None:
    action = decide(backup(), replace(RUNNING, prefix_taken=None))
    assert isinstance(action, Wait)
    assert action.reason == "LocationUnavailable"
