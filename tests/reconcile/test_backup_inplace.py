"""A backup restored into the VM it was taken of, as a pure function of what the agent saw."""

from __future__ import annotations

from dataclasses import replace

import pytest

from virtfleet.api.snapshot import RestorePhase
from virtfleet.reconcile.backup import Outcome
from virtfleet.reconcile.backup_inplace import (
    MAX_ATTEMPTS,
    BackupFacts,
    Commit,
    Done,
    Fail,
    Fetch,
    InPlaceObserved,
    InPlaceView,
    Later,
    Nothing,
    Replace,
    Retry,
    Wait,
    decide_in_place,
)

BACKUP = BackupFacts(phase="Completed", vm_name="web", deleting=False, disks=("root", "data"))
STOPPED = InPlaceObserved(
    backup=BACKUP,
    domain_active=False,
    vm_disks=("root", "data", "scratch"),
    snapshots=0,
    fetch_running=False,
    fetch_outcome=None,
    fetch_error=None,
    replaced=False,
)


def view(phase: RestorePhase | None = None, attempt: int = 1) -> InPlaceView:
    return InPlaceView(
        name="r1", vm_name="web", backup_name="nightly", phase=phase, attempt=attempt
    )


IN_PROGRESS = view(RestorePhase.IN_PROGRESS)


@pytest.mark.parametrize("phase", [RestorePhase.SUCCEEDED, RestorePhase.FAILED])
def test_a_finished_restore_does_nothing(phase: RestorePhase) -> None:
    assert decide_in_place(view(phase), replace(STOPPED, replaced=True)) == Nothing()


def test_a_stopped_vm_is_committed_with_the_disks_both_have() -> None:
    """Only disks the backup holds are replaced; one added since keeps its data."""
    assert decide_in_place(view(), STOPPED) == Commit(("root", "data"))


def test_a_running_vm_waits_with_what_to_do() -> None:
    """Disks are never replaced under a running guest: wait, and say how to stop it."""
    action = decide_in_place(view(), replace(STOPPED, domain_active=True))
    assert isinstance(action, Wait)
    assert action.reason == "VMRunning"
    assert "Halted" in action.message


def test_a_missing_backup_waits() -> None:
    action = decide_in_place(view(), replace(STOPPED, backup=None))
    assert isinstance(action, Wait)
    assert action.reason == "BackupNotFound"


def test_an_unfinished_backup_waits() -> None:
    action = decide_in_place(view(), replace(STOPPED, backup=replace(BACKUP, phase="Uploading")))
    assert isinstance(action, Wait)
    assert action.reason == "BackupNotCompleted"


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (replace(BACKUP, phase="Failed"), "BackupFailed"),
        (replace(BACKUP, deleting=True), "BackupDeleting"),
        (replace(BACKUP, vm_name="db"), "BackupOfAnotherVM"),
        (replace(BACKUP, disks=("other",)), "NoDisksToRestore"),
    ],
)
def test_a_backup_that_cannot_serve_is_refused(facts: BackupFacts, reason: str) -> None:
    action = decide_in_place(view(), replace(STOPPED, backup=facts))
    assert isinstance(action, Fail)
    assert action.reason == reason


def test_a_backup_of_another_vm_says_how_to_restore_it_instead() -> None:
    action = decide_in_place(view(), replace(STOPPED, backup=replace(BACKUP, vm_name="db")))
    assert isinstance(action, Fail)
    assert "db" in action.message
    assert "new VM" in action.message


def test_a_vm_with_snapshots_is_refused_before_anything_is_replaced() -> None:
    """Internal snapshots live inside the disks: replacing them would lose those."""
    action = decide_in_place(view(), replace(STOPPED, snapshots=2))
    assert isinstance(action, Fail)
    assert action.reason == "VMHasSnapshots"
    assert "VMSnapshots" in action.message


def test_committed_fetches_first() -> None:
    assert decide_in_place(IN_PROGRESS, STOPPED) == Fetch(("root", "data"))


def test_a_running_fetch_is_left_alone() -> None:
    assert decide_in_place(IN_PROGRESS, replace(STOPPED, fetch_running=True)) == Nothing()


def test_a_fetched_chain_replaces_the_disks() -> None:
    seen = replace(STOPPED, fetch_outcome=Outcome.SUCCEEDED)
    assert decide_in_place(IN_PROGRESS, seen) == Replace(("root", "data"))


def test_replaced_disks_finish_the_restore() -> None:
    action = decide_in_place(IN_PROGRESS, replace(STOPPED, replaced=True))
    assert isinstance(action, Done)
    assert "root, data" in action.message


def test_a_vm_started_by_hand_mid_restore_waits_before_the_replacement() -> None:
    """The hold stops the agent, not ``virsh start``: never replace under a guest."""
    seen = replace(STOPPED, fetch_outcome=Outcome.SUCCEEDED, domain_active=True)
    action = decide_in_place(IN_PROGRESS, seen)
    assert isinstance(action, Wait)
    assert action.reason == "VMRunning"


def test_a_failed_fetch_is_retried_with_a_growing_delay() -> None:
    seen = replace(STOPPED, fetch_outcome=Outcome.FAILED, fetch_error="ChecksumMismatch")
    first = decide_in_place(view(RestorePhase.IN_PROGRESS, attempt=1), seen)
    second = decide_in_place(view(RestorePhase.IN_PROGRESS, attempt=2), seen)
    assert isinstance(first, Retry)
    assert isinstance(second, Retry)
    assert first.message == "ChecksumMismatch"
    assert second.seconds == 2 * first.seconds


def test_the_last_failed_fetch_fails_and_says_the_disks_are_untouched() -> None:
    seen = replace(STOPPED, fetch_outcome=Outcome.FAILED, fetch_error="NoSuchKey")
    action = decide_in_place(view(RestorePhase.IN_PROGRESS, attempt=MAX_ATTEMPTS), seen)
    assert isinstance(action, Fail)
    assert "NoSuchKey" in action.message
    assert "not replaced" in action.message


def test_a_backup_gone_mid_restore_fails_before_any_replacement() -> None:
    action = decide_in_place(IN_PROGRESS, replace(STOPPED, backup=None))
    assert isinstance(action, Fail)
    assert action.reason == "BackupGone"


def test_disks_gone_mid_restore_fail_with_that_reason() -> None:
    action = decide_in_place(IN_PROGRESS, replace(STOPPED, vm_disks=()))
    assert isinstance(action, Fail)
    assert action.reason == "NoDisksToRestore"


def test_a_failed_replacement_is_an_attempt() -> None:
    seen = replace(STOPPED, fetch_outcome=Outcome.SUCCEEDED, replace_error="ENOSPC")
    action = decide_in_place(IN_PROGRESS, seen)
    assert isinstance(action, Retry)
    assert action.message == "ENOSPC"


def test_a_failure_after_the_replacement_began_says_the_disks_may_be_changed() -> None:
    """Never "not replaced" once a volume may have been: the VM stays held instead."""
    began = replace(view(RestorePhase.IN_PROGRESS, attempt=MAX_ATTEMPTS), replacing=True)
    seen = replace(STOPPED, fetch_outcome=Outcome.FAILED, fetch_error="NoSuchKey")
    action = decide_in_place(began, seen)
    assert isinstance(action, Fail)
    assert "partly replaced" in action.message
    assert "not replaced" not in action.message
    gone = decide_in_place(replace(began, attempt=1), replace(STOPPED, backup=None))
    assert isinstance(gone, Fail)
    assert "partly replaced" in gone.message


def test_a_retry_waits_out_its_back_off() -> None:
    """The retry's own status write wakes the loop at once: not a new fetch yet."""
    assert decide_in_place(IN_PROGRESS, replace(STOPPED, retry_in=3.0)) == Later(3.0)
