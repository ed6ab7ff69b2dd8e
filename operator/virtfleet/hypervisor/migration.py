"""Live migration of one domain, peer to peer, and its cancellation.

``migrateToURI3`` blocks until the job ends, so it runs in the long executor while the
caller polls :meth:`Guest.job_progress` from the short one and may :func:`abort` it.
Flags (DESIGN §6): ``LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE`` always — the
target keeps a persistent definition, the source forgets its own only after success —
plus ``NON_SHARED_DISK`` with an explicit disk list when node-local disks are copied
(read-only seeds and shared disks are not), and ``UNSAFE`` when a disk stays in a pool
both nodes share (libvirt cannot prove the sharing for a plain directory pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import libvirt

from virtfleet.hypervisor import backup
from virtfleet.hypervisor.guest import Guest

__all__ = [
    "MigrationRequest",
    "abort",
    "completed_downtime_ms",
    "migrate",
    "migration_flags",
    "start_post_copy",
]


@dataclass(frozen=True)
class MigrationRequest:
    """What to migrate where, and how (all from the VMMigration and the target VMHost)."""

    #: The target's libvirt URI (``VMHost.status.migrationURI``), for the P2P control link.
    dest_uri: str
    #: Where QEMU's data stream goes (``VIR_MIGRATE_PARAM_URI``), e.g. ``tcp://10.0.0.2``.
    data_uri: str | None = None
    #: Disk targets (``vda``) to copy: node-local disks, pre-created on the target.
    copy_disks: Sequence[str] = ()
    #: Some disk stays in place on storage both nodes see.
    shared_disks: bool = False
    bandwidth_mibps: int | None = None
    max_downtime_ms: int | None = None
    auto_converge: bool = False
    #: Allow a switch to post-copy (``VIR_MIGRATE_POSTCOPY``); :func:`start_post_copy` does it.
    post_copy: bool = False


def migration_flags(request: MigrationRequest) -> int:
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    if request.copy_disks:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    if request.shared_disks:
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    if request.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if request.post_copy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    return int(flags)


def migration_params(request: MigrationRequest) -> dict[str, object]:
    params: dict[str, object] = {}
    if request.data_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = request.data_uri
    if request.copy_disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(request.copy_disks)
    if request.bandwidth_mibps:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(request.bandwidth_mibps)
    return params


async def migrate(guest: Guest, request: MigrationRequest) -> None:
    """Run the migration to the end (long executor); raises the translated libvirt error."""
    flags = migration_flags(request)
    params = migration_params(request)
    dom = guest.handle
    # Bitmaps would travel without libvirt's checkpoints and break a revert on the target.
    await backup.drop_checkpoints(guest)
    if request.max_downtime_ms:
        # No migration parameter for it: QEMU takes it as a setting before the job starts.
        await guest.executors.run(dom.migrateSetMaxDowntime, int(request.max_downtime_ms), 0)
    await guest.executors.run_long(dom.migrateToURI3, request.dest_uri, params, flags)


async def abort(guest: Guest) -> None:
    """Cancel the domain's running job; the guest keeps running on the source."""
    await guest.executors.run(guest.handle.abortJob)


async def start_post_copy(guest: Guest) -> None:
    """Switch the running job to post-copy: the guest runs on the target from now on and
    pulls missing pages from the source. A failure after this loses the guest."""
    await guest.executors.run(guest.handle.migrateStartPostCopy, 0)


async def completed_downtime_ms(guest: Guest) -> int | None:
    """The downtime libvirt measured, from the target's record of the completed incoming
    job (``KEEP_COMPLETED`` so a second reader still finds it); None if it has none."""
    stats = await guest.executors.run(
        guest.handle.jobStats,
        libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED,
    )
    value = stats.get("downtime")
    return int(value) if isinstance(value, int) else None
