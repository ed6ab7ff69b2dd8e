"""The upload of one backup: scratch files into the bucket in parts, the manifest last.

Runs as a task of its own (no VM lock: it only reads the scratch files through libvirt),
so a long upload never holds the VM's other loops. Parts move in parallel, each read from
libvirt by a range stream, hashed and uploaded; the manifest records each part's sha256.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from virtfleet.agent.backups.state import MANIFEST_KIND, BackupDisk, BackupMemo, scratch_name
from virtfleet.api.backup import BackupDiskStatus, VMBackupStatus
from virtfleet.api.conditions import rfc3339
from virtfleet.backupstore.s3 import (
    MANIFEST,
    TRANSFER_WORKERS,
    BackupBucket,
    PartDigests,
    StoreError,
    backup_prefix,
    part_size_for,
)
from virtfleet.hypervisor import Hypervisor, storage
from virtfleet.identity import API_GROUP, API_VERSION


@dataclass(frozen=True)
class DiskUpload:
    """One disk in the bucket: what status shows, and the parts' digests for the manifest."""

    status: BackupDiskStatus
    parts: PartDigests

    def to_manifest(self) -> dict[str, Any]:
        return {
            **self.status.to_wire(),
            "partSize": self.parts.part_size,
            "partSha256": list(self.parts.sha256),
        }


async def upload_backup(
    hv: Hypervisor,
    bucket: BackupBucket,
    location_prefix: str,
    key: tuple[str, str],
    uid: str,
    status: VMBackupStatus,
    *,
    node: str,
    vm: Mapping[str, Any],
    vm_uid: str,
    disks: list[BackupDisk],
    domain_xml: str,
    memo: BackupMemo,
    gate: asyncio.Semaphore,
) -> list[DiskUpload]:
    """The disks, then the manifest (last: the backup exists once it does). ``gate`` bounds
    the parts in flight (each in memory) across all uploads of the node."""
    prefix = backup_prefix(location_prefix, key[0], key[1])
    results = await upload_disks(hv, bucket, prefix, vm_uid, uid, disks, memo, gate)
    # Parents go to the same location: its prefix is derived, never looked up (a parent
    # being deleted meanwhile is still the chain's base, held by its child).
    parent_prefix = backup_prefix(location_prefix, key[0], status.parent) if status.parent else None
    body = manifest(
        namespace=key[0],
        name=key[1],
        uid=uid,
        status=status,
        parent_prefix=parent_prefix,
        node=node,
        vm=vm,
        domain_xml=domain_xml,
        disks=results,
    )
    await write_manifest(bucket, prefix, body)
    return results


async def upload_disks(
    hv: Hypervisor,
    bucket: BackupBucket,
    prefix: str,
    vm_uid: str,
    backup_uid: str,
    disks: list[BackupDisk],
    memo: BackupMemo,
    gate: asyncio.Semaphore,
) -> list[DiskUpload]:
    """Each disk's scratch file into ``<prefix>disks/<disk>.qcow2``, in parts."""
    memo.upload_total = memo.upload_done = 0
    sizes: dict[str, int] = {}
    for disk in disks:
        sizes[disk.name] = await storage.file_size(
            hv, disk.pool, scratch_name(vm_uid, disk.name, backup_uid)
        )
        memo.upload_total += sizes[disk.name]
    results: list[DiskUpload] = []
    for disk in disks:
        object_key = f"{prefix}disks/{disk.name}.qcow2"
        scratch = scratch_name(vm_uid, disk.name, backup_uid)
        parts = await upload_parts(
            hv, bucket, object_key, disk.pool, scratch, sizes[disk.name], memo, gate
        )
        source = await storage.lookup_volume(hv, disk.pool, disk.path.rsplit("/", 1)[-1])
        status = BackupDiskStatus(
            name=disk.name,
            object_key=object_key,
            virtual_size=source.capacity if source is not None else None,
            uploaded_bytes=parts.length,
            sha256=parts.summary,
        )
        results.append(DiskUpload(status, parts))
    return results


async def upload_parts(
    hv: Hypervisor,
    bucket: BackupBucket,
    key: str,
    pool: str,
    volume: str,
    length: int,
    memo: BackupMemo,
    gate: asyncio.Semaphore,
) -> PartDigests:
    """The volume's file as object ``key``: parts in parallel (as many as ``gate`` lets
    through), each read
    through a libvirt stream of its own, hashed and uploaded (no part is read twice, no
    copy of the file is made). A failure aborts the multipart upload: nothing half-made
    is left under ``key``."""
    loop = asyncio.get_running_loop()
    if length <= 0:  # a qcow2 file has at least its header: something removed it
        raise StoreError("SourceFailed", f"{volume} is empty")
    part_size = part_size_for(length)
    count = PartDigests.count(length, part_size)
    shape = PartDigests(length, part_size, ("",) * count)
    digests: list[str] = [""] * count
    etags: list[str] = [""] * count
    if count == 1:
        async with gate:
            data = await storage.read_range(hv, pool, volume, 0, length)
            if len(data) != length:
                raise StoreError("SourceFailed", f"{volume}: {len(data)} of {length} bytes read")
            digests[0] = await loop.run_in_executor(None, _sha256, data)
            await loop.run_in_executor(None, bucket.put_bytes, key, data)
        memo.upload_done += len(data)
        return PartDigests(length, part_size, tuple(digests))
    upload_id = await loop.run_in_executor(None, bucket.begin_upload, key)

    pending = iter(range(count))  # shared by the workers: each part taken once

    async def worker() -> None:
        for index in pending:
            offset, size = shape.span(index)
            async with gate:
                data = await storage.read_range(hv, pool, volume, offset, size)
                if len(data) != size:
                    raise StoreError("SourceFailed", f"{volume}: part {index + 1} is short")
                digests[index] = await loop.run_in_executor(None, _sha256, data)
                etags[index] = await loop.run_in_executor(
                    None, bucket.upload_part, key, upload_id, index + 1, data
                )
            memo.upload_done += size

    tasks = [asyncio.create_task(worker()) for _ in range(min(TRANSFER_WORKERS, count))]
    try:
        await asyncio.gather(*tasks)
        await loop.run_in_executor(None, bucket.finish_upload, key, upload_id, etags)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.run_in_executor(None, bucket.abort_upload, key, upload_id)
        raise
    return PartDigests(length, part_size, tuple(digests))


def _sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(
    *,
    namespace: str,
    name: str,
    uid: str,
    status: VMBackupStatus,
    parent_prefix: str | None,
    node: str,
    vm: Mapping[str, Any],
    domain_xml: str,
    disks: list[DiskUpload],
) -> dict[str, Any]:
    """What the bucket keeps about the backup: enough to restore it with nothing else."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": MANIFEST_KIND,
        "backup": {"namespace": namespace, "name": name, "uid": uid},
        "type": status.type,
        "parent": status.parent,
        "parentPrefix": parent_prefix,
        "checkpoint": status.checkpoint,
        "node": node,
        "startTime": status.start_time,
        "completionTime": rfc3339(datetime.now(UTC)),
        "vm": {
            "name": vm["metadata"]["name"],
            "uid": vm["metadata"]["uid"],
            "labels": vm["metadata"].get("labels") or {},
            "spec": copy.deepcopy(vm.get("spec") or {}),
            "domainXML": domain_xml,
        },
        "disks": [d.to_manifest() for d in disks],
    }


async def write_manifest(bucket: BackupBucket, prefix: str, body: Mapping[str, Any]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, bucket.put_json, prefix + MANIFEST, body)
