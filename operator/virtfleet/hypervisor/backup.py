"""libvirt's backup API for one domain: push backups, checkpoints, and reading the result.

A backup is a push job (``virDomainBackupBegin``): QEMU copies each disk, as it was when
the job started, into a qcow2 file next to the disk in its pool, while the guest runs on.
With a checkpoint, QEMU also starts a persistent dirty bitmap; the next backup with
``<incremental>`` copies only the blocks that bitmap saw change. Facts measured on the
harness nodes (libvirt 9.0, QEMU 7.2) that shaped the rules in ``docs/backups.md``:

- bitmaps need qcow2 compat 1.1 (``volume_xml`` sets it for every new volume);
- an internal snapshot can be *taken* next to a checkpoint, but a *revert* with a dirty
  bitmap present fails and leaves the domain shut off ("Device has active dirty bitmaps"),
  so :func:`drop_checkpoints` runs before every revert;
- a live migration with storage copy takes the bitmaps along but not libvirt's checkpoint
  metadata, leaving bitmaps nobody can delete that break a later revert on the target, so
  :func:`drop_checkpoints` runs before every migration too;
- libvirt refuses to delete a checkpoint of an inactive domain; the domain is started
  paused (no guest code runs) for the deletion and destroyed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import libvirt
from lxml import etree

from virtfleet.domain.jobs import JobProgress, parse_job_stats
from virtfleet.hypervisor import errors
from virtfleet.hypervisor.guest import Guest
from virtfleet.logs import get_logger

__all__ = [
    "BackupTarget",
    "abort",
    "begin",
    "checkpoint_names",
    "completed_job",
    "delete_checkpoint",
    "drop_checkpoints",
    "forget_checkpoints",
    "running_job",
]

_log = get_logger("virtfleet.hypervisor.backup")


@dataclass(frozen=True)
class BackupTarget:
    """One disk to back up: its target (``vda``) and the file QEMU writes (node path)."""

    dev: str
    path: str


def backup_xml(targets: Sequence[BackupTarget], incremental_from: str | None) -> str:
    root = etree.Element("domainbackup", mode="push")
    if incremental_from is not None:
        etree.SubElement(root, "incremental").text = incremental_from
    disks = etree.SubElement(root, "disks")
    for target in targets:
        disk = etree.SubElement(disks, "disk", name=target.dev, backup="yes", type="file")
        etree.SubElement(disk, "target", file=target.path)
        etree.SubElement(disk, "driver", type="qcow2")
    return etree.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, devs: Sequence[str]) -> str:
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    disks = etree.SubElement(root, "disks")
    for dev in devs:
        etree.SubElement(disks, "disk", name=dev, checkpoint="bitmap")
    return etree.tostring(root, encoding="unicode")


async def begin(
    guest: Guest,
    targets: Sequence[BackupTarget],
    *,
    incremental_from: str | None,
    checkpoint: str | None,
) -> None:
    """Start the push job; returns at once (the job runs in QEMU)."""
    xml = backup_xml(targets, incremental_from)
    cp = checkpoint_xml(checkpoint, [t.dev for t in targets]) if checkpoint else None
    await guest.executors.run(lambda: guest.handle.backupBegin(xml, cp, 0))


async def abort(guest: Guest) -> None:
    """Cancel the domain's backup job (its target files stay; the caller deletes them)."""
    await guest.executors.run(guest.handle.abortJob)


async def running_job(guest: Guest) -> JobProgress:
    return await guest.job_progress()


async def completed_job(guest: Guest) -> JobProgress | None:
    """The domain's last completed job as libvirt kept it (None when it kept nothing)."""

    def call() -> JobProgress | None:
        try:
            stats = guest.handle.jobStats(
                libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
            )
        except libvirt.libvirtError as exc:
            _log.info("no completed job statistics", error=str(exc))
            return None
        return parse_job_stats(stats) if stats else None

    return await guest.executors.run(call)


async def checkpoint_names(guest: Guest) -> list[str]:
    def call() -> list[str]:
        return [str(cp.getName()) for cp in guest.handle.listAllCheckpoints(0)]

    return await guest.executors.run(call)


async def delete_checkpoint(guest: Guest, name: str) -> bool:
    """Delete one checkpoint (its bitmap merges into its parent's); False if it was gone."""

    def call() -> bool:
        try:
            cp = guest.handle.checkpointLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if isinstance(errors.translate(exc), errors.NotFound):
                return False
            raise
        cp.delete(0)
        return True

    return await guest.executors.run(call)


async def drop_checkpoints(guest: Guest) -> list[str]:
    """Delete every checkpoint and its bitmaps (see the module doc for why and when)."""

    def call() -> list[str]:
        dom = guest.handle
        try:
            names = [str(cp.getName()) for cp in dom.listAllCheckpoints(0)]
        except libvirt.libvirtError as exc:
            if isinstance(errors.translate(exc), errors.Unsupported):
                return []  # a driver without checkpoints (the test driver) has none
            raise
        if not names:
            return []
        started = False
        if not dom.isActive():
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            started = True
        try:
            roots = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS)
            for root in roots:
                root.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
        finally:
            if started:
                dom.destroy()
        return names

    dropped = await guest.executors.run_long(call)
    if dropped:
        _log.info("checkpoints dropped", domain=guest.name, checkpoints=dropped)
    return dropped


async def forget_checkpoints(guest: Guest) -> list[str]:
    """Delete the checkpoints' metadata only, bitmaps untouched: for a stopped domain whose
    disk files are about to be replaced (the bitmaps go with the old files). libvirt
    allows this on an inactive domain, unlike a full deletion (:func:`drop_checkpoints`)."""

    def call() -> list[str]:
        dom = guest.handle
        try:
            roots = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS)
        except libvirt.libvirtError as exc:
            if isinstance(errors.translate(exc), errors.Unsupported):
                return []  # a driver without checkpoints (the test driver) has none
            raise
        names = [str(cp.getName()) for cp in dom.listAllCheckpoints(0)]
        for root in roots:
            root.delete(
                libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN
                | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
            )
        return names

    forgotten = await guest.executors.run(call)
    if forgotten:
        _log.info("checkpoints forgotten", domain=guest.name, checkpoints=forgotten)
    return forgotten
