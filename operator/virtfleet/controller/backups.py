"""The controller's part of backups: locations, deleting backups, restores into new VMs.

Node agents take the backups (they hold the domains); everything that needs only the
bucket runs here, so it works when the VM's node is gone:

- **VMBackupLocation**: checked (head bucket, write and delete a probe object) when it
  changes and every ``checkInterval``; ``status.phase`` Available or Unavailable with the
  store's reason.
- **VMBackup deletion**: the controller's finalizer deletes the backup's objects (manifest
  first) unless ``deletionPolicy: Retain``, and holds the object while a later incremental
  depends on it (condition ``DeletionBlocked`` naming them): a chain is never broken.
- **VMRestore with backupName**: creates the new VirtualMachine from the backup's manifest
  (the bucket's copy of the VM's spec) with its disks' source set to the backup, then
  reports Succeeded once the VM is Ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from virtfleet.api.backup import VMBackupLocationSpec
from virtfleet.api.conditions import Condition, ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.quantity import parse_duration
from virtfleet.api.snapshot import RestorePhase
from virtfleet.backupstore.s3 import MANIFEST, BackupBucket, StoreError, namespace_prefix
from virtfleet.logs import get_logger
from virtfleet.reconcile import backup_control as rules
from virtfleet.runtime.kube import Conflict, KubeApi, KubeError, NotFound
from virtfleet.runtime.locations import open_bucket, open_location
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch

COMPONENT = "virtfleet-controller"
#: Held on every VMBackup: its objects are deleted (or kept) before the object goes.
BACKUP_FINALIZER = "virtfleet.io/backup-objects"
RETRY_SECONDS = 10.0

#: Queue keys: (kind, namespace, name).
BKey = tuple[str, str, str]
LOCATION, BACKUP, RESTORE = "VMBackupLocation", "VMBackup", "VMRestore"


class BackupController:
    def __init__(self, kube: KubeApi, vms: Mapping[tuple[str, str], Any]) -> None:
        self.kube = kube
        #: The controller's fleet cache of VMs (name → cached VM with ``.body``).
        self.vms = vms
        self.cache: dict[BKey, dict[str, Any]] = {}
        self.queue: WorkQueue[BKey] = WorkQueue(name="backups", workers=2)
        self.log = get_logger("virtfleet.controller.backups")

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
        self.cache[key] = dict(body)
        self.queue.add(key)

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
            return await self._restore(key, body)
        except Conflict:
            return 1.0

    async def _write_status(self, key: BKey, body: Mapping[str, Any], new: dict[str, Any]) -> None:
        patch = status_patch(body.get("status"), new)
        if patch is None:
            return
        try:
            updated = await self.kube.patch_status(key[0], key[1], key[2], patch)
        except NotFound:
            return
        if key in self.cache:
            self.cache[key] = dict(updated)

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
        status["conditions"] = _conditions(
            status,
            generation,
            ConditionStatus.TRUE if available else ConditionStatus.FALSE,
            reason,
            message,
            stalled=not available,
        )
        await self._write_status(key, body, status)
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
            manifest = await loop.run_in_executor(None, bucket.get_json, manifest_key)
            if not isinstance(manifest, dict):
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
                await self._set_finalizers(key, body, [*finalizers, BACKUP_FINALIZER])
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
            await self._write_status(key, body, status)
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
        await self._set_finalizers(key, body, [f for f in finalizers if f != BACKUP_FINALIZER])
        return None

    async def _set_finalizers(self, key: BKey, body: Mapping[str, Any], new: list[str]) -> None:
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
        if key in self.cache:
            self.cache[key] = dict(updated)

    # --- restores from backups ----------------------------------------------------------------

    async def _restore(self, key: BKey, body: Mapping[str, Any]) -> float | None:
        spec = body.get("spec") or {}
        backup_name = str(spec.get("backupName"))
        backup = self.cache.get((BACKUP, key[1], backup_name))
        cached_vm = self.vms.get((key[1], str(spec.get("vmName"))))
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
                status["phase"] = RestorePhase.PENDING.value
                status["conditions"] = _conditions(
                    status, generation, ConditionStatus.FALSE, reason, message, stalled=False
                )
                await self._write_status(key, body, status)
                return RETRY_SECONDS
            case rules.RestoreFail(reason=reason, message=message):
                status.update(phase=RestorePhase.FAILED.value, complete=False)
                status["error"] = {"message": message, "time": now}
                status["conditions"] = _conditions(
                    status, generation, ConditionStatus.FALSE, reason, message, stalled=True
                )
                await self._write_status(key, body, status)
                await self.kube.record_event(body, "Warning", reason, message, COMPONENT)
                return None
            case rules.RestoreProgress(message=message):
                status["phase"] = RestorePhase.IN_PROGRESS.value
                status["conditions"] = _conditions(
                    status, generation, ConditionStatus.FALSE, "Restoring", message, stalled=False
                )
                await self._write_status(key, body, status)
                return None  # the VM's events bring it back
            case rules.RestoreDone(message=message):
                status.update(
                    phase=RestorePhase.SUCCEEDED.value,
                    complete=True,
                    restoreTime=now,
                    nodeName=((vm or {}).get("status") or {}).get("nodeName"),
                    vmUID=((vm or {}).get("metadata") or {}).get("uid"),
                )
                status["conditions"] = _conditions(
                    status, generation, ConditionStatus.TRUE, "Succeeded", message, stalled=False
                )
                await self._write_status(key, body, status)
                await self.kube.record_event(body, "Normal", "Restored", message, COMPONENT)
                return None
            case rules.RestoreCreateVM():
                assert backup is not None
                return await self._create_vm(key, body, backup, status)
        return None

    async def _create_vm(
        self, key: BKey, body: Mapping[str, Any], backup: Mapping[str, Any], status: dict[str, Any]
    ) -> float | None:
        location = str((backup.get("spec") or {}).get("location", ""))
        prefix = str((backup.get("status") or {}).get("objectPrefix") or "")
        _, got = await open_location(self.kube, key[1], location)
        if not isinstance(got, BackupBucket):
            status["phase"] = RestorePhase.PENDING.value
            status["conditions"] = _conditions(
                status,
                body["metadata"].get("generation"),
                ConditionStatus.FALSE,
                "LocationUnavailable",
                got,
                stalled=False,
            )
            await self._write_status(key, body, status)
            return RETRY_SECONDS
        try:
            manifest = await asyncio.get_running_loop().run_in_executor(
                None, got.get_json, prefix + MANIFEST
            )
        except StoreError as exc:
            self.log.info("manifest not read", restore=key[2], why=exc.message)
            return RETRY_SECONDS
        finally:
            got.close()
        if manifest is None:
            status.update(phase=RestorePhase.FAILED.value, complete=False)
            message = f"the bucket has no manifest under {prefix}: the backup is gone"
            status["error"] = {"message": message, "time": rfc3339(datetime.now(UTC))}
            status["conditions"] = _conditions(
                status,
                body["metadata"].get("generation"),
                ConditionStatus.FALSE,
                "BackupGone",
                message,
                stalled=True,
            )
            await self._write_status(key, body, status)
            return None
        vm = rules.restored_vm(body, str(body["spec"]["backupName"]), manifest)
        # Created once: the VM carries this restore's uid (an annotation), so after a crash
        # between the create and the status write the next pass knows the VM as its own.
        try:
            await self.kube.create("VirtualMachine", vm)
        except Conflict:
            return 1.0  # it exists: the next pass tells ours from another
        except KubeError as exc:
            message = f"the VirtualMachine could not be created: {exc}"
            status.update(phase=RestorePhase.FAILED.value, complete=False)
            status["error"] = {"message": message, "time": rfc3339(datetime.now(UTC))}
            status["conditions"] = _conditions(
                status,
                body["metadata"].get("generation"),
                ConditionStatus.FALSE,
                "CreateRefused",
                message,
                stalled=True,
            )
            await self._write_status(key, body, status)
            return None
        status.update(phase=RestorePhase.IN_PROGRESS.value, vmCreated=True)
        message = f"VirtualMachine {vm['metadata']['name']} created from the backup"
        status["conditions"] = _conditions(
            status,
            body["metadata"].get("generation"),
            ConditionStatus.FALSE,
            "Restoring",
            message,
            stalled=False,
        )
        await self._write_status(key, body, status)
        await self.kube.record_event(body, "Normal", "VMCreated", message, COMPONENT)
        return None


def _conditions(
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
