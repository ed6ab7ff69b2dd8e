"""A restore from a backup *into the VM it was taken of*: what the VM's agent does next.

A VMRestore whose ``backupName`` names a backup of an existing VM ``vmName`` replaces that
VM's backed-up disks with the backup's (KubeVirt's restore of an existing VM, Velero's
restore over a namespace's objects). The rules, in order:

1. the VM must be stopped: its disks are replaced only while no guest writes them. The
   restore waits (``VMRunning``) until the run strategy or a stop request stops it;
2. the commitment (``InProgress``, a compare-and-swap write) is made first. From then on
   the agent does not start the VM (``start_held``) until the restore ends, so no guest
   write can fall between a replacement and a repeat of it after a crash: replacing the
   disks again with the same backup is then harmless, and an agent killed anywhere just
   does it again;
3. the chain is fetched and checked (every sha256, every layer's header) and joined into
   one qcow2 per disk *before* any disk is touched: a backup that cannot be read leaves
   the VM's disks as they were (``Failed`` says so);
4. under the VM's lock: ``disksReplacing`` is recorded (compare-and-swap) before the
   first volume is touched, the domain's checkpoints are forgotten (their bitmaps were in
   the old files) and each disk's volume is replaced by its restored image. A failure
   from then on cannot say "nothing changed": the restore fails saying the disks may be
   partly replaced, and the VM stays held until that VMRestore is deleted (an explicit
   act: the user decides whether to boot such disks or to restore again).

A VM with VMSnapshots is refused: their data lives inside its disks (internal qcow2
snapshots) and would be lost with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from virtfleet.api.backup import BackupPhase
from virtfleet.api.snapshot import RestorePhase
from virtfleet.reconcile.backup import Outcome

MAX_ATTEMPTS = 3
RETRY_SECONDS = 5.0
WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class InPlaceView:
    name: str
    vm_name: str
    backup_name: str
    phase: RestorePhase | None
    attempt: int
    #: Status says a replacement began (some disks may already be the backup's).
    replacing: bool = False


@dataclass(frozen=True)
class BackupFacts:
    phase: str | None
    vm_name: str
    deleting: bool
    #: The disks the backup holds.
    disks: tuple[str, ...]


@dataclass(frozen=True)
class InPlaceObserved:
    backup: BackupFacts | None
    domain_active: bool
    #: The VM's writable disks (their spec names).
    vm_disks: tuple[str, ...]
    #: libvirt snapshots of the domain (their data is inside the disks).
    snapshots: int
    fetch_running: bool
    fetch_outcome: Outcome | None
    fetch_error: str | None
    #: This process replaced the disks in this attempt (it writes Succeeded next).
    replaced: bool
    #: The replacement of this attempt failed (libvirt's error).
    replace_error: str | None = None
    #: Seconds until the next attempt may start (a retry's back-off).
    retry_in: float = 0.0


@dataclass(frozen=True)
class Wait:
    reason: str
    message: str
    seconds: float = WAIT_SECONDS


@dataclass(frozen=True)
class Commit:
    """Claim the restore and record InProgress (the VM is held stopped from now on)."""

    disks: tuple[str, ...]


@dataclass(frozen=True)
class Fetch:
    disks: tuple[str, ...]


@dataclass(frozen=True)
class Replace:
    disks: tuple[str, ...]


@dataclass(frozen=True)
class Done:
    message: str


@dataclass(frozen=True)
class Retry:
    message: str
    seconds: float


@dataclass(frozen=True)
class Fail:
    reason: str
    message: str


@dataclass(frozen=True)
class Later:
    """Look again in ``seconds``, writing nothing."""

    seconds: float


@dataclass(frozen=True)
class Nothing:
    pass


InPlaceAction = Wait | Commit | Fetch | Replace | Done | Retry | Fail | Later | Nothing


def restorable_disks(backup: BackupFacts, vm_disks: Sequence[str]) -> tuple[str, ...]:
    """The VM's disks the backup holds (a disk added since keeps its data)."""
    return tuple(d for d in vm_disks if d in backup.disks)


def decide_in_place(view: InPlaceView, seen: InPlaceObserved) -> InPlaceAction:
    if view.phase in (RestorePhase.SUCCEEDED, RestorePhase.FAILED):
        return Nothing()
    backup = seen.backup
    if view.phase in (None, RestorePhase.PENDING):
        refused = _refusal(view, seen)
        if refused is not None:
            return refused
        assert backup is not None
        if backup.phase != BackupPhase.COMPLETED.value:
            return Wait("BackupNotCompleted", f"VMBackup {view.backup_name} is {backup.phase}")
        if seen.domain_active:
            return Wait(
                "VMRunning",
                f"VirtualMachine {view.vm_name} is running: its disks are replaced only "
                "while it is stopped; stop it (runStrategy Halted, or a stop request with "
                "Manual) and the restore goes on",
            )
        return Commit(restorable_disks(backup, seen.vm_disks))

    # InProgress: committed; the VM is held stopped until this ends.
    disks = restorable_disks(backup, seen.vm_disks) if backup is not None else ()
    if seen.replaced:
        return Done(
            f"disks {', '.join(disks)} of VirtualMachine {view.vm_name} replaced by "
            f"VMBackup {view.backup_name}"
        )
    if seen.fetch_running:
        return Nothing()
    if seen.retry_in > 0:
        return Later(seen.retry_in)
    failed = seen.replace_error or (
        (seen.fetch_error or "the backup could not be read")
        if seen.fetch_outcome == Outcome.FAILED
        else None
    )
    if failed is not None:
        if view.attempt >= MAX_ATTEMPTS:
            return _fail(
                view, "RestoreFailed", f"attempt {view.attempt} of {MAX_ATTEMPTS} failed: {failed}"
            )
        return Retry(failed, RETRY_SECONDS * 2 ** max(0, view.attempt - 1))
    if backup is None or backup.phase != BackupPhase.COMPLETED.value:
        return _fail(
            view, "BackupGone", f"VMBackup {view.backup_name} went away during the restore"
        )
    if not disks:
        return _fail(
            view,
            "NoDisksToRestore",
            f"VirtualMachine {view.vm_name} no longer has a disk VMBackup {view.backup_name} "
            "holds (its domain or its disks went away during the restore)",
        )
    if seen.domain_active:
        return Wait(
            "VMRunning",
            f"VirtualMachine {view.vm_name} was started by hand during its restore; stop it "
            "and the restore goes on",
        )
    if seen.fetch_outcome == Outcome.SUCCEEDED:
        return Replace(disks)
    return Fetch(disks)


def _fail(view: InPlaceView, reason: str, why: str) -> Fail:
    """Failed, saying what became of the disks: untouched, or perhaps partly replaced (then
    the VM stays held until this VMRestore is deleted)."""
    if view.replacing:
        return Fail(
            reason,
            f"{why}; the VM's disks may be partly replaced, so it is kept stopped until "
            f"VMRestore {view.name} is deleted (restore again, or delete it to boot the disks "
            "as they are)",
        )
    return Fail(reason, f"{why}; the VM's disks were not replaced")


def _refusal(view: InPlaceView, seen: InPlaceObserved) -> Wait | Fail | None:
    backup = seen.backup
    if backup is None:
        return Wait("BackupNotFound", f"VMBackup {view.backup_name} does not exist")
    if backup.phase == BackupPhase.FAILED.value:
        return Fail("BackupFailed", f"VMBackup {view.backup_name} failed")
    if backup.deleting:
        return Fail("BackupDeleting", f"VMBackup {view.backup_name} is being deleted")
    if backup.vm_name != view.vm_name:
        return Fail(
            "BackupOfAnotherVM",
            f"VMBackup {view.backup_name} is of VirtualMachine {backup.vm_name}, and "
            f"VirtualMachine {view.vm_name} exists: a backup replaces the disks of its own VM "
            "only; to restore it as a new VM, name one that does not exist",
        )
    if backup.phase == BackupPhase.COMPLETED.value and not restorable_disks(backup, seen.vm_disks):
        return Fail(
            "NoDisksToRestore",
            f"VirtualMachine {view.vm_name} has none of the disks VMBackup "
            f"{view.backup_name} holds ({', '.join(backup.disks) or 'none'})",
        )
    if seen.snapshots:
        return Fail(
            "VMHasSnapshots",
            f"VirtualMachine {view.vm_name} has {seen.snapshots} snapshot(s) kept inside its "
            "disks, which replacing the disks would lose: delete its VMSnapshots first, or "
            "restore the backup as a new VM",
        )
    return None
