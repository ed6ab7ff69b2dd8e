"""What the backup loop reads about a VM's backups and disks, and cleans after an attempt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lxml import etree

from virtfleet.agent.backups.state import BackupDisk, scratch_name
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.volumes import pool_for
from virtfleet.api.backup import BackupPhase
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain.jobs import JobOperation
from virtfleet.domain.naming import disk_name_from_alias
from virtfleet.hypervisor import Guest, Hypervisor, backup, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.logs import get_logger
from virtfleet.reconcile import backup as rules

_log = get_logger("virtfleet.agent.backups")


def parents_of(
    backups: Mapping[Key, Mapping[str, Any]], view: rules.BackupView, vm_uid: str
) -> list[rules.ParentCandidate]:
    """Completed backups of the same VM (uid) to the same location, newest first."""
    assert view.spec is not None
    found = []
    for (namespace, _), body in backups.items():
        status = body.get("status") or {}
        if (
            namespace == view.namespace
            and body["metadata"].get("uid") != view.uid
            and not body["metadata"].get("deletionTimestamp")
            and (body.get("spec") or {}).get("location") == view.spec.location
            and status.get("vmUID") == vm_uid
            and status.get("phase") == BackupPhase.COMPLETED.value
        ):
            found.append(
                (
                    str(status.get("completionTime") or ""),
                    rules.ParentCandidate(
                        name=str(body["metadata"]["name"]),
                        checkpoint=status.get("checkpoint"),
                        object_prefix=status.get("objectPrefix"),
                    ),
                )
            )
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


async def writable_disks(
    settings: AgentSettings, vm: Mapping[str, Any], guest: Guest | None
) -> list[BackupDisk]:
    """The VM's writable disks, with the target and file its domain gives each."""
    if guest is None:
        return []
    spec = VirtualMachineSpec.model_validate(vm.get("spec") or {})
    root = etree.fromstring((await guest.xml()).encode())
    by_name: dict[str, tuple[str, str]] = {}
    for disk in root.iterfind("devices/disk[@device='disk']"):
        alias = disk.find("alias")
        name = disk_name_from_alias(alias.get("name") if alias is not None else None)
        target, source = disk.find("target"), disk.find("source")
        if name and target is not None and source is not None and source.get("file"):
            by_name[name] = (str(target.get("dev")), str(source.get("file")))
    return [
        BackupDisk(d.name, by_name[d.name][0], pool_for(settings, d), by_name[d.name][1])
        for d in spec.disks
        if not d.read_only and d.name in by_name
    ]


async def scratch_present(
    hv: Hypervisor, vm_uid: str, backup_uid: str, disks: list[BackupDisk]
) -> tuple[bool, bool]:
    """Whether a scratch file of the backup is in a pool, and whether that could not be
    told: a pool libvirt would not refresh (a long pool job: a stopped VM's copy) does
    not know the files QEMU wrote since, so "not found" there means "not known yet"."""
    unsure = False
    for disk in disks:
        try:
            await storage.refresh_pool(hv, disk.pool)
        except hv_errors.HypervisorError as exc:  # a busy pool: the lookup below still answers
            _log.info("pool not refreshed", pool=disk.pool, error=str(exc))
            unsure = True
        if await storage.lookup_volume(hv, disk.pool, scratch_name(vm_uid, disk.name, backup_uid)):
            return True, False
    return False, unsure


async def delete_scratch(
    hv: Hypervisor, vm_uid: str, backup_uid: str, disks: list[BackupDisk]
) -> None:
    for disk in disks:
        name = scratch_name(vm_uid, disk.name, backup_uid)
        if await storage.delete_volume(hv, disk.pool, name):
            _log.debug("scratch deleted", volume=name)


async def clean(
    hv: Hypervisor,
    guest: Guest | None,
    vm_uid: str,
    backup_uid: str,
    disks: list[BackupDisk],
    drop_checkpoint: str | None,
) -> None:
    """What one attempt left: its job (aborted), its checkpoint, its scratch files."""
    if guest is not None and await guest.is_active():
        job = await backup.running_job(guest)
        if job.active and job.operation == JobOperation.BACKUP:
            await backup.abort(guest)
        if drop_checkpoint:
            await backup.delete_checkpoint(guest, drop_checkpoint)
    await delete_scratch(hv, vm_uid, backup_uid, disks)
