"""A VMRestore with ``backupName`` in the controller: the new VM, made once, then watched
until it is Ready (decisions: :mod:`virtfleet.reconcile.backup_control`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from virtfleet.api.conditions import ConditionStatus, rfc3339
from virtfleet.api.snapshot import RestorePhase
from virtfleet.backupstore.s3 import MANIFEST, BackupBucket, StoreError
from virtfleet.controller.backup_common import (
    BACKUP,
    COMPONENT,
    RETRY_SECONDS,
    BackupObjects,
    BKey,
    conditions,
)
from virtfleet.reconcile import backup_control as rules
from virtfleet.runtime.kube import Conflict, KubeError
from virtfleet.runtime.locations import open_location


async def reconcile_restore(
    objs: BackupObjects, vms: Mapping[tuple[str, str], Any], key: BKey, body: Mapping[str, Any]
) -> float | None:
    spec = body.get("spec") or {}
    backup_name = str(spec.get("backupName"))
    backup = objs.cache.get((BACKUP, key[1], backup_name))
    cached_vm = vms.get((key[1], str(spec.get("vmName"))))
    vm = getattr(cached_vm, "body", None)
    action = rules.decide_restore(body, backup, vm)
    status = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    now = rfc3339(datetime.now(UTC))
    status.setdefault("startTime", now)
    match action:
        case rules.RestoreNothing():
            return None
        case rules.RestoreWait(reason=reason, message=message):
            await _not_yet(objs, key, body, status, RestorePhase.PENDING, reason, message)
            return RETRY_SECONDS
        case rules.RestoreFail(reason=reason, message=message):
            await _fail(objs, key, body, status, reason, message)
            await objs.kube.record_event(body, "Warning", reason, message, COMPONENT)
            return None
        case rules.RestoreProgress(message=message):
            await _not_yet(objs, key, body, status, RestorePhase.IN_PROGRESS, "Restoring", message)
            return None  # the VM's events bring it back
        case rules.RestoreDone(message=message):
            status.update(
                phase=RestorePhase.SUCCEEDED.value,
                complete=True,
                restoreTime=now,
                nodeName=((vm or {}).get("status") or {}).get("nodeName"),
                vmUID=((vm or {}).get("metadata") or {}).get("uid"),
            )
            status["conditions"] = conditions(
                status, generation, ConditionStatus.TRUE, "Succeeded", message, stalled=False
            )
            await objs.write_status(key, body, status)
            await objs.kube.record_event(body, "Normal", "Restored", message, COMPONENT)
            return None
        case rules.RestoreCreateVM():
            assert backup is not None
            return await _create_vm(objs, key, body, backup, status)
    return None


async def _create_vm(
    objs: BackupObjects,
    key: BKey,
    body: Mapping[str, Any],
    backup: Mapping[str, Any],
    status: dict[str, Any],
) -> float | None:
    location = str((backup.get("spec") or {}).get("location", ""))
    prefix = str((backup.get("status") or {}).get("objectPrefix") or "")
    _, got = await open_location(objs.kube, key[1], location)
    if not isinstance(got, BackupBucket):
        await _not_yet(objs, key, body, status, RestorePhase.PENDING, "LocationUnavailable", got)
        return RETRY_SECONDS
    try:
        manifest = await asyncio.get_running_loop().run_in_executor(
            None, got.get_json, prefix + MANIFEST
        )
    except StoreError as exc:
        objs.log.info("manifest not read", restore=key[2], why=exc.message)
        return RETRY_SECONDS
    finally:
        got.close()
    if manifest is None:
        message = f"the bucket has no manifest under {prefix}: the backup is gone"
        await _fail(objs, key, body, status, "BackupGone", message)
        return None
    vm = rules.restored_vm(body, str(body["spec"]["backupName"]), manifest)
    # Created once: the VM carries this restore's uid (an annotation), so after a crash
    # between the create and the status write the next pass knows the VM as its own.
    try:
        await objs.kube.create("VirtualMachine", vm)
    except Conflict:
        return 1.0  # it exists: the next pass tells ours from another
    except KubeError as exc:
        message = f"the VirtualMachine could not be created: {exc}"
        await _fail(objs, key, body, status, "CreateRefused", message)
        return None
    status["vmCreated"] = True
    message = f"VirtualMachine {vm['metadata']['name']} created from the backup"
    await _not_yet(objs, key, body, status, RestorePhase.IN_PROGRESS, "Restoring", message)
    await objs.kube.record_event(body, "Normal", "VMCreated", message, COMPONENT)
    return None


async def _not_yet(
    objs: BackupObjects,
    key: BKey,
    body: Mapping[str, Any],
    status: dict[str, Any],
    phase: RestorePhase,
    reason: str,
    message: str,
) -> None:
    """Pending or InProgress, with the reason in Ready and Reconciling."""
    status["phase"] = phase.value
    generation = body["metadata"].get("generation")
    status["conditions"] = conditions(
        status, generation, ConditionStatus.FALSE, reason, message, stalled=False
    )
    await objs.write_status(key, body, status)


async def _fail(
    objs: BackupObjects,
    key: BKey,
    body: Mapping[str, Any],
    status: dict[str, Any],
    reason: str,
    message: str,
) -> None:
    """Failed for good: the error, and the reason in Ready and Stalled."""
    status.update(phase=RestorePhase.FAILED.value, complete=False)
    status["error"] = {"message": message, "time": rfc3339(datetime.now(UTC))}
    generation = body["metadata"].get("generation")
    status["conditions"] = conditions(
        status, generation, ConditionStatus.FALSE, reason, message, stalled=True
    )
    await objs.write_status(key, body, status)
