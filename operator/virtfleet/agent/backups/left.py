"""A VM that leaves its node during a backup there: the backup stops and fails, saying why."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from virtfleet.api.backup import BackupPhase, VMBackupStatus
from virtfleet.api.conditions import ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.snapshot import SnapshotError
from virtfleet.identity import Key
from virtfleet.reconcile.vm_model import EventNote

if TYPE_CHECKING:
    from virtfleet.agent.backups.loop import BackupAgent


def stop_backups(owner: BackupAgent, vm_key: Key) -> None:
    """The VM left this node (migrated, deleted) during a backup this node runs: the
    upload stops (aborted: no object of it stays, and two nodes never write one
    backup's objects) and the backup fails saying why (its job and checkpoint were this
    node's; a new backup on the VM's new node starts afresh)."""
    for key, body in list(owner.backups.items()):
        status = body.get("status") or {}
        if (
            key[0] != vm_key[0]
            or (body.get("spec") or {}).get("vmName") != vm_key[1]
            or status.get("nodeName") != owner.node
            or status.get("phase")
            not in (BackupPhase.IN_PROGRESS.value, BackupPhase.UPLOADING.value)
        ):
            continue
        memo = owner.memos.pop(str(body["metadata"].get("uid")), None)
        if memo is not None and memo.upload is not None and not memo.upload.done():
            memo.upload.cancel()
        owner.log.info("backup stopped: its VM left the node", vmbackup=key[1])
        task = asyncio.create_task(_fail(owner, key), name=f"backup-left-{key[1]}")
        owner.left_tasks.add(task)
        task.add_done_callback(owner.left_tasks.discard)


async def _fail(owner: BackupAgent, key: Key) -> None:
    body = owner.backups.get(key)
    if body is None:
        return
    message = (
        f"the VM left node {owner.node} (migrated or deleted) during its backup; take a new backup"
    )
    now = rfc3339(datetime.now(UTC))
    status = VMBackupStatus.model_validate(body.get("status") or {})
    status = status.model_copy(
        update={
            "phase": BackupPhase.FAILED,
            "error": SnapshotError(message=message, time=now),
            "completion_time": now,
        }
    )
    conditions = kstatus_conditions(
        status.conditions,
        body["metadata"].get("generation"),
        ready=(ConditionStatus.FALSE, "VMLeftNode", message),
        reconciling=None,
        stalled=("VMLeftNode", message),
    )
    status = status.model_copy(update={"conditions": conditions})
    if await owner.store.write_status(key, body, status, cas=True):
        await owner.store.record_events(body, [EventNote("Warning", "VMLeftNode", message)])
