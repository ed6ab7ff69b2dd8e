"""What the VM's agent does next for one VMBackup: a pure function of what it observed.

Phases: ``Pending`` (waiting for the location or the VM) → ``InProgress`` (the libvirt
push job copies the disks into scratch files next to them; for a stopped VM, libvirt
copies its volumes, their backing chains read through) → ``Uploading`` (the scratch
files stream to the bucket, then the manifest is written, last) → ``Completed``; or
``Failed`` with a reason. A crash anywhere is a new *attempt* (at most
:data:`MAX_ATTEMPTS`): what the last one left (its checkpoint, its scratch files) is
removed first, so the chain the next incremental builds on is never broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from virtfleet.api.backup import BackupMode, BackupPhase, BackupType, VMBackupSpec, VMBackupStatus

MAX_ATTEMPTS = 3
#: The first retry waits this long, each later one twice as long (a store restarting, a
#: libvirtd coming back): 5 s, 10 s, so three attempts span about half a minute.
RETRY_BASE_SECONDS = 5.0
PROGRESS_POLL_SECONDS = 1.0
#: A job or an upload is looked at this soon at first (most of a small one is over in a
#: few hundred ms), then every PROGRESS_POLL_SECONDS once it has run FAST_POLL_FOR.
FIRST_POLL_SECONDS = 0.05
FAST_POLL_FOR = 3.0
LOCATION_RETRY_SECONDS = 10.0
POOL_BUSY_RECHECK_SECONDS = 2.0


def poll_seconds(running_for: float) -> float:
    """How soon to look at a running job or upload again."""
    return FIRST_POLL_SECONDS if running_for < FAST_POLL_FOR else PROGRESS_POLL_SECONDS


def checkpoint_name(backup_uid: str) -> str:
    """The libvirt checkpoint a backup leaves: derived from its uid, found again after a crash."""
    return f"vf-{backup_uid}"


@dataclass(frozen=True)
class BackupView:
    name: str
    namespace: str
    uid: str
    spec: VMBackupSpec | None
    status: VMBackupStatus
    deleting: bool


@dataclass(frozen=True)
class ParentCandidate:
    """A Completed backup of the same VM to the same location (newest first in lists)."""

    name: str
    checkpoint: str | None
    object_prefix: str | None


class Outcome(StrEnum):
    """How this process last saw the backup's job or upload end (None: it did not see)."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Observed:
    vm_uid: str | None
    running: bool
    location_found: bool
    location_available: bool
    location_message: str
    #: The domain's checkpoints.
    checkpoints: tuple[str, ...]
    job_active: bool
    #: The push job as this process saw it end, and libvirt's error if it failed.
    job_outcome: Outcome | None
    job_error: str | None
    scratch_present: bool
    upload_running: bool
    upload_outcome: Outcome | None
    upload_error: str | None
    parents: Sequence[ParentCandidate] = ()
    #: The VM has a writable disk (what a backup copies).
    has_disks: bool = True
    #: The VM's domain is defined on this node (a stopped VM is backed up from its volumes).
    defined: bool = True
    #: A pool could not be refreshed (busy with a long job): files QEMU wrote since are not
    #: known to it, so a scratch file not found may still exist.
    pool_busy: bool = False
    #: The bucket already holds a backup of this name (asked before the claim; None: the
    #: store could not tell).
    prefix_taken: bool | None = False
    #: Seconds until the next attempt may start (a retry's back-off; the watch event of
    #: the retry's own status write must not start it at once).
    retry_in: float = 0.0


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str
    message: str


@dataclass(frozen=True)
class Claim:
    """Adopt the backup (node label) and commit to its type and parent."""

    type: BackupType
    parent: ParentCandidate | None
    checkpoint: str | None


@dataclass(frozen=True)
class StartJob:
    incremental_from: str | None
    checkpoint: str | None
    #: Checkpoints to delete first: all but the parent's (at most one is kept per VM).
    stale_checkpoints: tuple[str, ...]


@dataclass(frozen=True)
class CopyVolumes:
    """A stopped VM: copy each disk's volume (backing chain read through) into its scratch
    file, under the VM's lock so that it cannot start meanwhile."""


@dataclass(frozen=True)
class ReportProgress:
    pass


@dataclass(frozen=True)
class StartUpload:
    pass


@dataclass(frozen=True)
class Complete:
    """The manifest is written: scratch files go, the parent's checkpoint too."""

    drop_checkpoint: str | None


@dataclass(frozen=True)
class Retry:
    """Clean what the failed attempt left, count an attempt, and go again."""

    phase: BackupPhase
    message: str
    drop_checkpoint: str | None
    delay: float = RETRY_BASE_SECONDS


@dataclass(frozen=True)
class Fail:
    reason: str
    message: str
    drop_checkpoint: str | None


@dataclass(frozen=True)
class Recheck:
    """Look again in ``seconds`` without writing anything (what was seen is not sure)."""

    seconds: float


@dataclass(frozen=True)
class Nothing:
    pass


Action = (
    Wait
    | Claim
    | StartJob
    | CopyVolumes
    | ReportProgress
    | StartUpload
    | Complete
    | Retry
    | Fail
    | Recheck
    | Nothing
)


def choose_type(
    mode: BackupMode, checkpoints: Sequence[str], parents: Sequence[ParentCandidate]
) -> tuple[BackupType, ParentCandidate | None] | Fail:
    """Incremental from the newest completed backup whose checkpoint the domain still has."""
    if mode == BackupMode.FULL:
        return BackupType.FULL, None
    parent = next((p for p in parents if p.checkpoint and p.checkpoint in checkpoints), None)
    if parent is not None:
        return BackupType.INCREMENTAL, parent
    if mode == BackupMode.INCREMENTAL:
        return Fail(
            "NoCheckpoint",
            "no earlier backup of this VM to this location left a checkpoint on its domain "
            "(none was taken, or a migration, a snapshot restore or a deletion removed it); "
            "use mode Auto or Full",
            None,
        )
    return BackupType.FULL, None


def decide(backup: BackupView, seen: Observed) -> Action:
    status = backup.status
    phase = status.phase
    own = checkpoint_name(backup.uid)
    if (
        backup.spec is None
        or backup.deleting
        or phase in (BackupPhase.COMPLETED, BackupPhase.FAILED)
    ):
        return Nothing()
    attempt = status.attempt or 0

    if phase in (None, BackupPhase.PENDING):
        if not seen.location_found:
            return Wait(
                LOCATION_RETRY_SECONDS,
                "LocationNotFound",
                f"VMBackupLocation {backup.spec.location} does not exist",
            )
        if not seen.location_available:
            return Wait(
                LOCATION_RETRY_SECONDS,
                "LocationUnavailable",
                f"VMBackupLocation {backup.spec.location} is not available: "
                f"{seen.location_message or 'not checked yet'}",
            )
        if seen.prefix_taken is None:
            return Wait(
                LOCATION_RETRY_SECONDS,
                "LocationUnavailable",
                f"VMBackupLocation {backup.spec.location} could not be asked whether it "
                f"already holds a backup named {backup.name}",
            )
        if seen.prefix_taken:
            return Fail(
                "BackupExists",
                f"the bucket of VMBackupLocation {backup.spec.location} already holds a "
                f"backup named {backup.name} (kept from a deleted VMBackup, or another "
                "cluster's): it is never overwritten; choose another name",
                None,
            )
        if not seen.running and not seen.defined:
            return Fail(
                "VMNotDefined",
                f"VirtualMachine {backup.spec.vm_name} has no domain on its node yet: "
                "nothing to back up",
                None,
            )
        if not seen.has_disks:
            return Fail(
                "NoDisks",
                f"VirtualMachine {backup.spec.vm_name} has no writable disk to back up",
                None,
            )
        if not seen.running:
            # No job, no checkpoint: a stopped VM's disks do not change, and the next backup
            # of the running VM is incremental from the last checkpoint its domain kept.
            if backup.spec.mode == BackupMode.INCREMENTAL:
                return Fail(
                    "VMNotRunning",
                    f"VirtualMachine {backup.spec.vm_name} is stopped: a stopped VM's backup "
                    "copies its volumes whole; use mode Auto or Full",
                    None,
                )
            return Claim(type=BackupType.FULL, parent=None, checkpoint=None)
        chosen = choose_type(backup.spec.mode, seen.checkpoints, seen.parents)
        if isinstance(chosen, Fail):
            return chosen
        return Claim(type=chosen[0], parent=chosen[1], checkpoint=own)

    if (
        phase in (BackupPhase.IN_PROGRESS, BackupPhase.UPLOADING)
        and seen.retry_in > 0
        and not seen.job_active
        and not seen.upload_running
    ):
        return Recheck(seen.retry_in)

    if (
        phase in (BackupPhase.IN_PROGRESS, BackupPhase.UPLOADING)
        and seen.pool_busy
        and not seen.scratch_present
        and not seen.job_active
        and not seen.upload_running
    ):
        # "Files gone" would cost an attempt: look again once the pool answers.
        return Recheck(POOL_BUSY_RECHECK_SECONDS)

    if phase == BackupPhase.IN_PROGRESS and status.checkpoint is None:
        return _offline(attempt, seen)

    if phase == BackupPhase.IN_PROGRESS:
        if seen.job_active:
            return ReportProgress()
        if seen.job_outcome == Outcome.SUCCEEDED:
            if seen.scratch_present:
                return StartUpload()
            return _retry_or_fail(
                attempt, BackupPhase.IN_PROGRESS, "the backup job's files are gone", own, seen
            )
        if seen.job_outcome == Outcome.FAILED or (
            seen.job_outcome is None and (seen.scratch_present or own in seen.checkpoints)
        ):
            why = seen.job_error or "the backup job was interrupted"
            return _retry_or_fail(attempt, BackupPhase.IN_PROGRESS, why, own, seen)
        if not seen.running:
            return Fail("VMNotRunning", "the VM stopped before its backup began", own)
        parent = status.parent
        incremental_from = None
        if status.type == BackupType.INCREMENTAL:
            found = next((p for p in seen.parents if p.name == parent), None)
            if found is None or found.checkpoint not in seen.checkpoints:
                return Fail(
                    "ParentCheckpointGone",
                    f"the checkpoint of parent backup {parent} is gone (the VM migrated, "
                    "was restored from a snapshot, or the parent was deleted); take a new "
                    "backup (mode Auto makes it full)",
                    own if own in seen.checkpoints else None,
                )
            incremental_from = found.checkpoint
        keep = {incremental_from} if incremental_from else set()
        stale = tuple(sorted(c for c in seen.checkpoints if c not in keep))
        return StartJob(incremental_from=incremental_from, checkpoint=own, stale_checkpoints=stale)

    if phase == BackupPhase.UPLOADING:
        job_cp = own if status.checkpoint is not None else None
        if seen.upload_running:
            return ReportProgress()
        if seen.upload_outcome == Outcome.SUCCEEDED:
            prior = next((p for p in seen.parents if p.name == status.parent), None)
            drop = prior.checkpoint if prior is not None else None
            return Complete(drop_checkpoint=drop if drop in seen.checkpoints else None)
        if seen.upload_outcome == Outcome.FAILED:
            why = seen.upload_error or "the upload failed"
            if seen.scratch_present:
                return _retry_or_fail(attempt, BackupPhase.UPLOADING, why, job_cp, seen)
            return _retry_or_fail(attempt, BackupPhase.IN_PROGRESS, why, job_cp, seen)
        if seen.scratch_present:
            return StartUpload()
        return _retry_or_fail(
            attempt, BackupPhase.IN_PROGRESS, "the backup's scratch files are gone", job_cp, seen
        )
    return Nothing()


def _offline(attempt: int, seen: Observed) -> Action:
    """A stopped VM's backup (claimed without a checkpoint): its volumes are copied."""
    if seen.job_outcome == Outcome.SUCCEEDED and seen.scratch_present:
        return StartUpload()
    if seen.job_outcome is not None or seen.scratch_present:
        why = seen.job_error or "the copy of the volumes was interrupted"
        return _retry_or_fail(attempt, BackupPhase.IN_PROGRESS, why, None, seen)
    if seen.running:
        return Fail(
            "VMStarted",
            "the VM started before its volumes were copied (a stopped VM is backed up from "
            "its volumes); create a new VMBackup: the running VM's is taken by a backup job",
            None,
        )
    return CopyVolumes()


def _retry_or_fail(
    attempt: int, phase: BackupPhase, why: str, own: str | None, seen: Observed
) -> Retry | Fail:
    """``own`` is the attempt's checkpoint; None for a stopped VM's copy (it has none)."""
    # An upload retry keeps the checkpoint: the data it marks is in the scratch files.
    drop = own if phase == BackupPhase.IN_PROGRESS and own in seen.checkpoints else None
    if attempt >= MAX_ATTEMPTS:
        return Fail(
            "BackupFailed",
            f"attempt {attempt} of {MAX_ATTEMPTS} failed: {why}",
            own if own in seen.checkpoints else None,
        )
    if phase == BackupPhase.IN_PROGRESS and own is not None and not seen.running:
        return Fail("VMNotRunning", f"the VM stopped during its backup ({why})", drop)
    return Retry(
        phase=phase,
        message=why,
        drop_checkpoint=drop,
        delay=RETRY_BASE_SECONDS * 2 ** max(0, attempt - 1),
    )
