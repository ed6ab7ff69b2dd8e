"""A VM's volumes on this node: their names, their pools, creating and deleting them."""

from __future__ import annotations

from virtfleet.agent import httpdisk
from virtfleet.agent.backupdisk import BackupDisks
from virtfleet.agent.errors import ActionError
from virtfleet.agent.seed import build_iso, seed_files
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.disks import BackupSource, DiskSource
from virtfleet.api.virtualmachine import Disk, HighAvailability, VirtualMachineSpec
from virtfleet.hypervisor import Hypervisor, VolumeRef, download, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.reconcile.views import parse_time
from virtfleet.reconcile.vm import VmView

#: The name ``decide()`` uses for the cloud-init seed among missing volumes.
SEED = "cloudInit"


def volume_name(uid: str, disk: str) -> str:
    """Volumes are named by the VM's uid: never reused by another VM of the same name."""
    return f"{uid}-{disk}.qcow2"


def seed_volume_name(uid: str) -> str:
    return f"{uid}-cidata.iso"


def pool_for(settings: AgentSettings, disk: Disk) -> str:
    """The disk's pool, if the agent may use it."""
    pool = disk.pool or settings.default_pool
    if pool not in settings.pools:
        allowed = ", ".join(settings.pools)
        raise ActionError(
            "PoolNotFound",
            f"disk {disk.name!r}: pool {pool!r} is not one of this node's pools ({allowed})",
            permanent=True,
        )
    return pool


async def ensure_volumes(
    hv: Hypervisor,
    settings: AgentSettings,
    http_policy: download.DestinationPolicy,
    vm: VmView,
    spec: VirtualMachineSpec,
    names: tuple[str, ...],
    user_data: str | None,
    backup_disks: BackupDisks | None = None,
    network_data: str | None = None,
) -> None:
    """Create the volumes ``names`` (disk names, or the seed) that the domain lacks.

    ``network_data``: the seed's network-config (the VM's own, else the one its
    VMNetworks' addresses make, :meth:`NetworkKeeper.network_config`)."""
    restored = await _failover_backup(settings, vm, backup_disks)
    for disk in spec.disks:
        if disk.name not in names:
            continue
        if restored is not None and disk.name in restored[1] and not disk.read_only:
            # RestoreFromBackup failover: the disk comes from the VM's latest backup.
            from_backup = BackupSource(backup_name=restored[0], disk=disk.name)
            disk = disk.model_copy(update={"source": DiskSource(backup=from_backup)})
        pool = pool_for(settings, disk)
        name = volume_name(vm.uid, disk.name)
        size = disk.size.bytes if disk.size is not None else None
        source = disk.source
        if source.image is not None:
            try:
                await storage.create_overlay(
                    hv, pool, name, VolumeRef(settings.image_pool, source.image), size
                )
            except hv_errors.NotFound as exc:
                raise ActionError(
                    "ImageNotFound",
                    f"disk {disk.name!r}: image {source.image!r} is not in node "
                    f"{settings.node_name}'s image store",
                    permanent=True,
                ) from exc
            except hv_errors.UnsafeImage as exc:
                raise ActionError(
                    "UnsafeImage", f"disk {disk.name!r}: {exc}", permanent=True
                ) from exc
        elif source.blank is not None:
            assert size is not None  # the API requires a size for blank disks
            await storage.create_blank(hv, pool, name, size)
        elif source.http is not None:
            await httpdisk.import_http(
                hv,
                settings,
                http_policy,
                uid=vm.uid,
                disk=disk,
                pool=pool,
                name=name,
                source=source.http,
                size=size,
            )
        elif source.backup is not None:
            if backup_disks is None:
                raise ActionError(
                    "BackupSourceUnsupported",
                    f"disk {disk.name!r}: this agent cannot restore backups",
                    permanent=True,
                )
            await backup_disks.import_backup(
                hv,
                namespace=vm.namespace,
                uid=vm.uid,
                disk=disk,
                pool=pool,
                name=name,
                size=size,
            )
    if SEED in names and spec.cloud_init is not None:
        files = seed_files(
            uid=vm.uid,
            hostname=vm.name,
            user_data=user_data if user_data is not None else spec.cloud_init.user_data,
            network_data=network_data or spec.cloud_init.network_data,
        )
        await storage.upload(
            hv,
            settings.default_pool,
            seed_volume_name(vm.uid),
            build_iso(files),
            replace=True,
        )


async def _failover_backup(
    settings: AgentSettings, vm: VmView, backup_disks: BackupDisks | None
) -> tuple[str, set[str]] | None:
    """(backup, its disks) when the VM failed over to this node by RestoreFromBackup."""
    failover = vm.status.failover
    if (
        failover is None
        or backup_disks is None
        or failover.policy is not HighAvailability.RESTORE_FROM_BACKUP
        or failover.to_node != settings.node_name
        or not failover.backup_name
    ):
        return None
    started, moved = parse_time(vm.status.last_start_time), parse_time(failover.time)
    if started is not None and moved is not None and started > moved:
        return None  # started here since: a disk missing now is a new one, made from spec
    return failover.backup_name, await backup_disks.disk_names(vm.namespace, failover.backup_name)


async def delete_volumes(hv: Hypervisor, settings: AgentSettings, uid: str) -> list[str]:
    """Every volume of the VM with ``uid`` in the agent's pools (also half-made ones)."""
    deleted = []
    for pool in settings.pools:
        try:
            volumes = await storage.list_volumes(hv, pool)
        except hv_errors.NotFound:
            continue
        for volume in volumes:
            if volume.name.startswith(f"{uid}-"):
                await storage.delete_volume(hv, pool, volume.name)
                deleted.append(f"{pool}/{volume.name}")
    return deleted
