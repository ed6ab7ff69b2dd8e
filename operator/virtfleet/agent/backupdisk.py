"""A disk whose ``source.backup`` the node restores: the chain from the bucket, joined.

The VMBackup names where its objects are; each manifest names its parent's, so the chain
(full first) is read from the bucket alone. Every object is checked against the sha256
its manifest recorded, the layers are joined with ``qemu-img`` into one qcow2
(:func:`~virtfleet.hypervisor.images.flatten_chain`), stored as the disk's base volume,
and the disk is made an overlay on it, last, as for ``source.http`` disks: the overlay's
existence says the disk is complete.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from virtfleet.agent.errors import ActionError
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.backup import BackupPhase
from virtfleet.api.virtualmachine import Disk
from virtfleet.backupstore.s3 import MANIFEST, BackupBucket, PartDigests, StoreError
from virtfleet.hypervisor import Hypervisor, VolumeRef, images, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.logs import get_logger
from virtfleet.runtime.kubeapi import KubeApi, KubeError, NotFound
from virtfleet.runtime.locations import open_location

_log = get_logger("virtfleet.agent.backupdisk")
#: Longest chain followed (a loop in forged manifests ends here).
MAX_CHAIN = 1000
#: S3's largest part: a manifest saying more is not one virtfleet wrote.
MAX_PART_SIZE = 5 * 2**30


def backup_base_volume_name(uid: str, disk: str) -> str:
    return f"{uid}-{disk}.backup-base"


def chain_of(bucket: BackupBucket, prefix: str, disk: str) -> list[tuple[str, PartDigests]]:
    """``(object key, its parts' digests)`` of the disk's layers, full first (blocking)."""
    layers: list[tuple[str, PartDigests]] = []
    seen: set[str] = set()
    current: str | None = prefix
    while current is not None:
        if current in seen or len(seen) >= MAX_CHAIN:
            raise StoreError("BrokenChain", f"the backup chain loops at {current}")
        seen.add(current)
        manifest = bucket.get_json(current + MANIFEST)
        if manifest is None:
            raise StoreError(
                "BackupIncomplete", f"no manifest at {current}: the backup is not complete"
            )
        entry = next((d for d in manifest.get("disks") or [] if d.get("name") == disk), None)
        if entry is None:
            raise StoreError("DiskNotInBackup", f"backup at {current} has no disk {disk!r}")
        layers.append((str(entry["objectKey"]), _digests(entry, current)))
        parent = manifest.get("parentPrefix") if manifest.get("type") == "Incremental" else None
        if manifest.get("type") == "Incremental" and not parent:
            raise StoreError(
                "BrokenChain",
                f"the incremental backup at {current} does not say where its parent is",
            )
        current = str(parent) if parent else None
    layers.reverse()
    return layers


def _digests(entry: dict[str, Any], where: str) -> PartDigests:
    """The parts a manifest records for one disk; a manifest without them is refused."""
    try:
        length, size = int(entry["uploadedBytes"]), int(entry["partSize"])
        digests = tuple(str(d) for d in entry["partSha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(
            "UnsupportedManifest", f"the manifest at {where} does not record its parts' sha256"
        ) from exc
    if (
        length <= 0
        or not 0 < size <= MAX_PART_SIZE
        or len(digests) != PartDigests.count(length, size)
    ):
        raise StoreError("UnsupportedManifest", f"the manifest at {where} has a bad part list")
    return PartDigests(length, size, digests)


async def fetch_flat(
    bucket: BackupBucket,
    prefix: str,
    disk: str,
    spool: Path,
    stop: threading.Event | None = None,
) -> tuple[Path, int]:
    """Disk ``disk`` of the backup at ``prefix`` as one checked qcow2 in ``spool``: every
    layer of its chain downloaded, each part's sha256 compared with its manifest's, its
    header checked, then the chain joined. Returns the file and how many layers it joined."""
    loop = asyncio.get_running_loop()
    layers = await loop.run_in_executor(None, chain_of, bucket, prefix, disk)
    paths = []
    for index, (key, parts) in enumerate(layers):
        path = spool / f"{disk}-layer-{index}.qcow2"
        download = functools.partial(bucket.download_verified, key, path, parts, stop=stop)
        await loop.run_in_executor(None, download)
        # Before qemu-img reads anything: a layer from a bucket must not name a host file
        # (backing file, data file) for qemu-img to follow. Only the layers above the first
        # get a backing, and it is replaced by the one below.
        check = functools.partial(
            images.inspect, str(path), name=f"layer-{index}.qcow2", allow_backing=index > 0
        )
        await loop.run_in_executor(None, check)
        paths.append(path)
    flat = spool / f"{disk}.qcow2"
    await loop.run_in_executor(None, images.flatten_chain, paths, flat)
    return flat, len(layers)


class BackupDisks:
    """Restores ``source.backup`` disks; holds the API client the driver does not have."""

    def __init__(self, kube: KubeApi, settings: AgentSettings) -> None:
        self.kube = kube
        self.settings = settings

    async def disk_names(self, namespace: str, backup_name: str) -> set[str]:
        """The disks VMBackup ``backup_name`` holds. A backup that cannot be read fails the
        pass (retried): creating the disks from the spec instead would never restore them."""
        try:
            backup = await self.kube.get("VMBackup", namespace, backup_name)
        except NotFound as exc:
            raise ActionError(
                "BackupNotFound",
                f"failover from VMBackup {backup_name}: the backup was deleted before the VM "
                "started on this node; restore it from another backup (VMRestore) or "
                "delete the VM",
                permanent=True,
            ) from exc
        except KubeError as exc:
            raise ActionError(
                "BackupUnreadable",
                f"failover from VMBackup {backup_name}: the backup cannot be read: {exc}",
                permanent=False,
            ) from exc
        disks = (backup.get("status") or {}).get("disks") or []
        return {str(d.get("name")) for d in disks if isinstance(d, dict)}

    async def import_backup(
        self,
        hv: Hypervisor,
        *,
        namespace: str,
        uid: str,
        disk: Disk,
        pool: str,
        name: str,
        size: int | None,
    ) -> None:
        assert disk.source.backup is not None
        source = disk.source.backup
        try:
            backup = await self.kube.get("VMBackup", namespace, source.backup_name)
        except NotFound as exc:
            raise ActionError(
                "BackupNotFound",
                f"disk {disk.name!r}: VMBackup {source.backup_name} does not exist",
                permanent=False,
            ) from exc
        status: dict[str, Any] = backup.get("status") or {}
        if status.get("phase") != BackupPhase.COMPLETED.value or not status.get("objectPrefix"):
            raise ActionError(
                "BackupNotCompleted",
                f"disk {disk.name!r}: VMBackup {source.backup_name} is not Completed",
                permanent=False,
            )
        location = str((backup.get("spec") or {}).get("location", ""))
        _, got = await open_location(self.kube, namespace, location)
        if not isinstance(got, BackupBucket):
            raise ActionError("LocationUnavailable", f"disk {disk.name!r}: {got}", permanent=False)
        loop = asyncio.get_running_loop()
        spool = Path(
            tempfile.mkdtemp(prefix=f"restore-{uid}-", dir=self.settings.download_dir or None)
        )
        try:
            flat, layers = await fetch_flat(got, str(status["objectPrefix"]), source.disk, spool)
            info = await loop.run_in_executor(None, lambda: images.inspect(str(flat)))
            base = backup_base_volume_name(uid, disk.name)
            stored = await storage.upload_file(hv, pool, base, str(flat))
            if stored.format != "qcow2" or stored.backing_path is not None:
                await storage.delete_volume(hv, pool, base)
                raise hv_errors.UnsafeImage("the restored disk is not a plain qcow2")
            grow = size if size is not None and size > info.virtual_size else None
            await storage.create_overlay(hv, pool, name, VolumeRef(pool, base), grow)
            _log.info(
                "disk restored from backup",
                uid=uid,
                disk=disk.name,
                backup=source.backup_name,
                layers=layers,
            )
        except StoreError as exc:
            raise ActionError(
                exc.reason, f"disk {disk.name!r}: {exc.message}", permanent=False
            ) from exc
        except KubeError as exc:
            raise ActionError("BackupUnreadable", str(exc), permanent=False) from exc
        except hv_errors.UnsafeImage as exc:
            raise ActionError("UnsafeImage", f"disk {disk.name!r}: {exc}", permanent=True) from exc
        finally:
            got.close()
            shutil.rmtree(spool, ignore_errors=True)
