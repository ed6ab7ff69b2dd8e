"""VMBackupSchedule in the controller: runs on time, missed runs reported, retention
applied (decisions: :mod:`virtfleet.reconcile.schedule`)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from virtfleet.api.conditions import ConditionStatus, parse_rfc3339, rfc3339
from virtfleet.api.schedule import VMBackupScheduleSpec
from virtfleet.controller.backup_common import (
    BACKUP,
    COMPONENT,
    BackupObjects,
    BKey,
    conditions,
)
from virtfleet.reconcile import schedule as schedule_rules
from virtfleet.reconcile.schedule import SCHEDULE_LABEL
from virtfleet.runtime.kube import Conflict, NotFound


async def reconcile_schedule(
    objs: BackupObjects, key: BKey, body: Mapping[str, Any]
) -> float | None:
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return None
    generation = meta.get("generation")
    status = dict(body.get("status") or {})
    try:
        spec = VMBackupScheduleSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"the schedule cannot be used: spec.{where}: {first['msg']}"
        status["observedGeneration"] = generation
        status["conditions"] = conditions(
            status, generation, ConditionStatus.FALSE, "InvalidSchedule", message, stalled=True
        )
        await objs.write_status(key, body, status)
        return None
    now = datetime.now(UTC)
    mine = [
        _scheduled(b)
        for k, b in objs.cache.items()
        if k[0] == BACKUP
        and k[1] == key[1]
        and ((b["metadata"].get("labels") or {}).get(SCHEDULE_LABEL) == key[2])
    ]
    last = status.get("lastScheduleTime")
    decision = schedule_rules.decide_schedule(
        key[2],
        spec,
        parse_rfc3339(last) if last else None,
        parse_rfc3339(str(meta["creationTimestamp"])),
        now,
        mine,
    )
    if decision.create is not None:
        name, moment, mode = decision.create
        manifest = {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": BACKUP,
            "metadata": {
                "name": name,
                "namespace": key[1],
                "labels": {SCHEDULE_LABEL: key[2]},
                "annotations": {"virtfleet.io/scheduled-time": rfc3339(moment)},
            },
            "spec": {
                "vmName": spec.vm_name,
                "location": spec.location,
                "mode": mode.value,
                "deletionPolicy": spec.deletion_policy.value,
            },
        }
        try:
            await objs.kube.create(BACKUP, manifest)
        except Conflict:
            # Made by an earlier pass that did not get to write status: the same run.
            objs.log.info("scheduled backup exists already", schedule=key[2], backup=name)
        status["lastBackup"] = name
    for victim in decision.prune:
        try:
            await objs.kube.delete(BACKUP, key[1], victim)
        except NotFound:
            continue
        objs.log.info("backup pruned", schedule=key[2], backup=victim)
    if decision.missed:
        status["missedRuns"] = int(status.get("missedRuns") or 0) + decision.missed
        status["lastMissedTime"] = rfc3339(now)
        await objs.kube.record_event(
            body, "Warning", "MissedSchedule", decision.missed_reason or "", COMPONENT
        )
    if decision.last_schedule_time is not None:
        status["lastScheduleTime"] = rfc3339(decision.last_schedule_time)
    status["nextScheduleTime"] = rfc3339(decision.next_schedule_time)
    status["observedGeneration"] = generation
    status["kept"] = len(decision.kept)
    ready = "Suspended" if spec.suspend else "Scheduled"
    message = "suspended: no runs" if spec.suspend else f"next run {status['nextScheduleTime']}"
    status["conditions"] = conditions(
        status, generation, ConditionStatus.TRUE, ready, message, stalled=False
    )
    await objs.write_status(key, body, status)
    wait = (decision.next_schedule_time - datetime.now(UTC)).total_seconds()
    return max(0.5, min(wait, 300.0))


def _scheduled(body: Mapping[str, Any]) -> schedule_rules.ScheduledBackup:
    meta, status = body["metadata"], body.get("status") or {}
    done = status.get("completionTime")
    return schedule_rules.ScheduledBackup(
        name=str(meta["name"]),
        phase=status.get("phase"),
        type=status.get("type"),
        parent=status.get("parent"),
        created=parse_rfc3339(str(meta["creationTimestamp"])),
        completed=parse_rfc3339(str(done)) if done else None,
        deleting=bool(meta.get("deletionTimestamp")),
    )
