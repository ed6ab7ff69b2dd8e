"""The controller's part of backups: locations, deleting backups, restores into new VMs.

Node agents take the backups (they hold the domains); everything that needs only the
bucket runs here, so it works when the VM's node is gone:

- **VMBackupLocation**: checked (head bucket, write and delete a probe object) when it
  changes and every ``checkInterval``; ``status.phase`` Available or Unavailable with the
  store's reason.
- **VMBackup deletion**: the controller's finalizer deletes the backup's objects (manifest
  first) unless ``deletionPolicy: Retain``, and holds the object while a later incremental
  depends on it (condition ``DeletionBlocked`` naming them): a chain is never broken.
- **VMRestore with backupName** (:mod:`.backup_restores`): creates the new VirtualMachine
  from the backup's manifest with its disks' source set to the backup, then reports
  Succeeded once the VM is Ready.
- **VMBackupSchedule** (:mod:`.backup_schedules`): runs, missed runs, retention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from virtfleet.api.backup import VMBackupLocationSpec
from virtfleet.api.conditions import ConditionStatus, rfc3339
from virtfleet.api.quantity import parse_duration
from virtfleet.backupstore.s3 import BackupBucket, StoreError, namespace_prefix
from virtfleet.controller.backup_common import (
    BACKUP,
    BACKUP_FINALIZER,
    COMPONENT,
    LOCATION,
    RESTORE,
    RETRY_SECONDS,
    SCHEDULE,
    BackupObjects,
    BKey,
    conditions,
)
from virtfleet.controller.backup_restores import reconcile_restore
from virtfleet.controller.backup_schedules import reconcile_schedule
from virtfleet.logs import get_logger
from virtfleet.reconcile import backup_control as rules
from virtfleet.reconcile.schedule import SCHEDULE_LABEL
from virtfleet.runtime.failures import cache_reporter
from virtfleet.runtime.kube import Conflict, KubeApi, KubeError
from virtfleet.runtime.locations import open_bucket, open_location
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.versions import store_newest


class BackupController:
    def __init__(self, kube: KubeApi, vms: Mapping[tuple[str, str], Any]) -> None:
        self.kube = kube
        #: The controller's fleet cache of VMs (name → cached VM with ``.body``).
        self.vms = vms
        self.log = get_logger("virtfleet.controller.backups")
        self.objects = BackupObjects(kube, self.log)
        self.cache = self.objects.cache
        self.queue: WorkQueue[BKey] = WorkQueue(
            name="backups",
            workers=2,
            # An unexpected error is reported on the object (condition, Event), then retried.
            on_error=cache_reporter(kube, lambda key: key[0], COMPONENT, self.cache, cas=True),
        )

    # --- intake -------------------------------------------------------------------------

    def event(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key: BKey = (kind, str(meta.get("namespace")), str(meta.get("name")))
        if kind == RESTORE and not (body.get("spec") or {}).get("backupName"):
            return  # snapshot restores are the agents' (and controller.unclaimed's)
        if event_type == "DELETED":
            self.cache.pop(key, None)
            self.queue.forget(key)
            return
        store_newest(self.cache, key, body)
        self.queue.add(key)
        schedule = ((body.get("metadata") or {}).get("labels") or {}).get(SCHEDULE_LABEL)
        if kind == BACKUP and schedule:
            self.queue.add((SCHEDULE, key[1], schedule))  # its schedule may prune now

    def vm_changed(self, namespace: str, name: str) -> None:
        for key, body in self.cache.items():
            if key[0] == RESTORE and key[1] == namespace and body["spec"].get("vmName") == name:
                self.queue.add(key)

    # --- the loop ---------------------------------------------------------------------

    async def reconcile(self, key: BKey) -> float | None:
        body = self.cache.get(key)
        if body is None:
            return None
        try:
            if key[0] == LOCATION:
                return await self._location(key, body)
            if key[0] == BACKUP:
                return await self._backup(key, body)
            if key[0] == SCHEDULE:
                return await reconcile_schedule(self.objects, key, body)
            return await reconcile_restore(self.objects, self.vms, key, body)
        except Conflict:
            return 1.0

    # --- locations ----------------------------------------------------------------------

    async def _location(self, key: BKey, body: Mapping[str, Any]) -> float | None:
        spec = VMBackupLocationSpec.model_validate(body.get("spec") or {})
        interval = (
            parse_duration(spec.check_interval)
            if spec.check_interval
            else rules.DEFAULT_CHECK_SECONDS
        )
        status = dict(body.get("status") or {})
        generation = body["metadata"].get("generation")
        now = datetime.now(UTC)
        wait = rules.seconds_until_check(status, generation, now, interval)
        if wait > 0:
            return wait
        loop = asyncio.get_running_loop()
        try:
            bucket = await open_bucket(self.kube, key[1], spec)
            try:
                count = await loop.run_in_executor(None, bucket.check)
                await self._sync(key, spec, bucket)
            finally:
                bucket.close()
        except StoreError as exc:
            available, reason, message, count = False, exc.reason, exc.message, None
        else:
            available, reason, message = True, "Available", f"bucket {spec.bucket} is writable"
        stamp = rfc3339(now)
        was = status.get("phase")
        status.update(
            observedGeneration=generation,
            phase="Available" if available else "Unavailable",
            message=None if available else message,
            lastCheckedTime=stamp,
        )
        if available:
            status["lastAvailableTime"] = stamp
            status["backupCount"] = count
        status["conditions"] = conditions(
            status,
            generation,
            ConditionStatus.TRUE if available else ConditionStatus.FALSE,
            reason,
            message,
            stalled=not available,
        )
        await self.objects.write_status(key, body, status)
        if was != status["phase"]:
            kind = "Normal" if available else "Warning"
            await self.kube.record_event(body, kind, reason, message, COMPONENT)
        return interval if available else min(interval, rules.UNAVAILABLE_RECHECK_SECONDS)

    async def _sync(self, key: BKey, spec: VMBackupLocationSpec, bucket: BackupBucket) -> None:
        """Backups found in the bucket (this namespace's, under the prefix) that have no
        VMBackup here become read-only ones (``status.synced``, ``deletionPolicy: Retain``),
        so a new cluster restores from the bucket alone (Velero's backup sync)."""
        loop = asyncio.get_running_loop()
        base = namespace_prefix(spec.prefix, key[1])
        known = {k[2] for k in self.cache if k[0] == BACKUP and k[1] == key[1]}
        for manifest_key in await loop.run_in_executor(None, bucket.list_manifests):
            name = rules.synced_name(manifest_key, base)
            if name is None or name in known:
                continue
            try:
                manifest = await loop.run_in_executor(None, bucket.get_json, manifest_key)
            except StoreError as exc:
                self.log.warning("manifest not synced", key=manifest_key, error=exc.message)
                continue
            if not isinstance(manifest, dict):
                self.log.warning("manifest not synced: not an object", key=manifest_key)
                continue
            body, status = rules.synced_backup(key[1], key[2], name, base + name + "/", manifest)
            try:
                created = await self.kube.create(BACKUP, body)
                await self.kube.patch_status(BACKUP, key[1], name, status)
            except Conflict:
                continue  # made meanwhile (by this cluster's agent or an earlier pass)
            except KubeError as exc:
                self.log.warning("backup not synced", backup=name, error=str(exc))
                continue
            self.log.info("backup synced from the bucket", namespace=key[1], backup=name)
            await self.kube.record_event(
                created,
                "Normal",
                "Synced",
                f"found in bucket {spec.bucket} under {base}{name}/",
                COMPONENT,
            )

    # --- backups (finalizer, deletion) ------------------------------------------------------

    async def _backup(self, key: BKey, body: Mapping[str, Any]) -> float | None:
        meta = body["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if not meta.get("deletionTimestamp"):
            if BACKUP_FINALIZER not in finalizers:
                await self.objects.set_finalizers(key, body, [*finalizers, BACKUP_FINALIZER])
            return None
        if BACKUP_FINALIZER not in finalizers:
            return None
        others = [b for k, b in self.cache.items() if k[0] == BACKUP]
        blockers = rules.dependents(key[2], key[1], others)
        if blockers:
            message = (
                f"incremental backups {', '.join(blockers)} build on this backup; it is deleted "
                "once they are (delete them first, or together)"
            )
            status = dict(body.get("status") or {})
            status["conditions"] = [
                c
                for c in status.get("conditions") or []
                if c.get("type") not in ("Stalled", "Ready")
            ] + [
                {
                    "type": "Stalled",
                    "status": "True",
                    "reason": "DeletionBlocked",
                    "message": message,
                    "lastTransitionTime": rfc3339(datetime.now(UTC)),
                },
            ]
            await self.objects.write_status(key, body, status)
            await self.kube.record_event(body, "Warning", "DeletionBlocked", message, COMPONENT)
            return RETRY_SECONDS
        policy = (body.get("spec") or {}).get("deletionPolicy", "Delete")
        prefix = (body.get("status") or {}).get("objectPrefix")
        if policy != "Retain" and prefix:
            location = str((body.get("spec") or {}).get("location", ""))
            spec, got = await open_location(self.kube, key[1], location, require_available=False)
            if spec is None:
                await self.kube.record_event(
                    body,
                    "Warning",
                    "ObjectsKept",
                    f"VMBackupLocation {location} is gone: objects under {prefix} were kept",
                    COMPONENT,
                )
            elif isinstance(got, str):
                self.log.info("backup objects not deleted yet", backup=key[2], why=got)
                return RETRY_SECONDS
            else:
                try:
                    deleted = await asyncio.get_running_loop().run_in_executor(
                        None, got.delete_prefix, prefix
                    )
                except StoreError as exc:
                    self.log.info("backup objects not deleted yet", backup=key[2], why=exc.message)
                    return RETRY_SECONDS
                finally:
                    got.close()
                self.log.info("backup objects deleted", backup=key[2], objects=deleted)
        await self.objects.set_finalizers(
            key, body, [f for f in finalizers if f != BACKUP_FINALIZER]
        )
        return None
