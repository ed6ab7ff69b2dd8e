"""What the backup loop remembers per backup, and the names it derives."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from virtfleet.api.backup import BackupDiskStatus
from virtfleet.reconcile import backup as rules

MANIFEST_KIND = "VMBackupManifest"


def scratch_name(vm_uid: str, disk: str, backup_uid: str) -> str:
    """The push job's file for one disk: next to the disk, uid-prefixed (deleted with the VM)."""
    return f"{vm_uid}-{disk}.backup-{backup_uid[:8]}.qcow2"


@dataclass
class BackupMemo:
    """What this process saw of one backup's job and upload (lost on restart: a new attempt)."""

    job_started: bool = False
    #: When this process started the job or the upload (monotonic), and last wrote progress.
    started_at: float = 0.0
    progress_written: float = 0.0
    job_outcome: rules.Outcome | None = None
    job_error: str | None = None
    upload: asyncio.Task[None] | None = None
    upload_outcome: rules.Outcome | None = None
    upload_error: str | None = None
    upload_done: int = 0
    upload_total: int = 0
    disks: list[BackupDiskStatus] = field(default_factory=list)
    #: Monotonic time before which the next attempt does not start (a retry's back-off).
    not_before: float = 0.0


@dataclass(frozen=True)
class BackupDisk:
    name: str
    dev: str
    pool: str
    path: str
