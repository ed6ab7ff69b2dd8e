"""What the controller's backup loops share: keys, constants, the cached objects and
their status writes, and the kstatus conditions of a status dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from virtfleet.api.conditions import Condition, ConditionStatus, kstatus_conditions
from virtfleet.runtime.kube import KubeApi, NotFound
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest

COMPONENT = "virtfleet-controller"
#: Held on every VMBackup: its objects are deleted (or kept) before the object goes.
BACKUP_FINALIZER = "virtfleet.io/backup-objects"
RETRY_SECONDS = 10.0

#: Queue keys: (kind, namespace, name).
BKey = tuple[str, str, str]
LOCATION, BACKUP, RESTORE = "VMBackupLocation", "VMBackup", "VMRestore"
SCHEDULE = "VMBackupSchedule"


class BackupObjects:
    """The watched backup objects of every kind, and writes that keep them current."""

    def __init__(self, kube: KubeApi, log: structlog.stdlib.BoundLogger) -> None:
        self.kube = kube
        self.cache: dict[BKey, dict[str, Any]] = {}
        self.log = log

    async def write_status(self, key: BKey, body: Mapping[str, Any], new: dict[str, Any]) -> None:
        patch = status_patch(body.get("status"), new)
        if patch is None:
            return
        try:
            updated = await self.kube.patch_status(key[0], key[1], key[2], patch)
        except NotFound:
            return
        store_newest(self.cache, key, updated, cached_only=True)

    async def set_finalizers(self, key: BKey, body: Mapping[str, Any], new: list[str]) -> None:
        patch = {
            "metadata": {
                "finalizers": new,
                "resourceVersion": body["metadata"].get("resourceVersion"),
            }
        }
        try:
            updated = await self.kube.patch(key[0], key[1], key[2], patch)
        except NotFound:
            return
        store_newest(self.cache, key, updated, cached_only=True)


def conditions(
    status: Mapping[str, Any],
    generation: int | None,
    ready: ConditionStatus,
    reason: str,
    message: str,
    *,
    stalled: bool,
) -> list[dict[str, Any]]:
    current = [Condition.model_validate(c) for c in status.get("conditions") or []]
    done = ready == ConditionStatus.TRUE
    out = kstatus_conditions(
        current,
        generation,
        ready=(ready, reason, message),
        reconciling=None if done or stalled else (reason, message),
        stalled=(reason, message) if stalled else None,
    )
    return [c.to_wire() for c in out]
