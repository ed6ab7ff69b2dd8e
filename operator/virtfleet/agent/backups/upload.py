"""The upload of one backup: scratch files streamed into the bucket, the manifest last.

Runs as a task of its own (no VM lock: it only reads the scratch files through libvirt),
so a long upload never holds the VM's other loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from virtfleet.agent.backups.state import MANIFEST_KIND, BackupDisk, BackupMemo, scratch_name
from virtfleet.api.backup import BackupDiskStatus, VMBackupStatus
from virtfleet.api.conditions import rfc3339
from virtfleet.backupstore.s3 import MANIFEST, BackupBucket, ChunkPipe, StoreError
from virtfleet.hypervisor import Hypervisor, backup, storage
from virtfleet.identity import API_GROUP, API_VERSION


async def upload_disks(
    hv: Hypervisor,
    bucket: BackupBucket,
    prefix: str,
    vm_uid: str,
    backup_uid: str,
    disks: list[BackupDisk],
    memo: BackupMemo,
) -> list[BackupDiskStatus]:
    """Each disk's scratch file into ``<prefix>disks/<disk>.qcow2``, hashed on the way."""
    loop = asyncio.get_running_loop()
    memo.upload_total = memo.upload_done = 0
    results: list[BackupDiskStatus] = []
    sizes: dict[str, int] = {}
    for disk in disks:
        name = scratch_name(vm_uid, disk.name, backup_uid)
        vol = await storage.lookup_volume(hv, disk.pool, name)
        sizes[disk.name] = vol.allocation if vol is not None else 0
        memo.upload_total += sizes[disk.name]
    for disk in disks:
        name = scratch_name(vm_uid, disk.name, backup_uid)
        object_key = f"{prefix}disks/{disk.name}.qcow2"
        pipe = ChunkPipe()

        def count(n: int) -> None:
            memo.upload_done += n

        up = loop.run_in_executor(
            None, _upload_or_release, bucket, object_key, pipe, count, sizes[disk.name]
        )
        try:
            length, digest = await backup.read_volume(hv, disk.pool, name, pipe.put)
        except BaseException:
            pipe.finish(failed=True)
            with contextlib.suppress(StoreError):  # the reader's error is the one to report
                await up
            raise
        pipe.finish()
        uploaded = await up
        if uploaded != length:
            raise StoreError("UploadFailed", f"{object_key}: {uploaded} of {length} bytes")
        source = await storage.lookup_volume(hv, disk.pool, disk.path.rsplit("/", 1)[-1])
        results.append(
            BackupDiskStatus(
                name=disk.name,
                object_key=object_key,
                virtual_size=source.capacity if source is not None else None,
                uploaded_bytes=length,
                sha256=digest,
            )
        )
    return results


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
    disks: list[BackupDiskStatus],
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
        "disks": [d.to_wire() for d in disks],
    }


async def write_manifest(bucket: BackupBucket, prefix: str, body: Mapping[str, Any]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, bucket.put_json, prefix + MANIFEST, body)


def _upload_or_release(
    bucket: BackupBucket, key: str, pipe: ChunkPipe, count: Callable[[int], None], size: int
) -> int:
    """Upload what the pipe brings; on failure release the reader blocked on a full pipe."""
    try:
        return bucket.upload(key, iter(pipe), count, size)
    except BaseException:
        pipe.consumer_failed()
        raise
