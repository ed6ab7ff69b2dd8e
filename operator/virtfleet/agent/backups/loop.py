"""The VMBackup loop of one node agent: observe → :func:`virtfleet.reconcile.backup.decide`
→ act, for the backups of the VMs on this node.

The push job and the checkpoints are the domain's (libvirt, under the VM's lock); the
upload is a task of its own (no lock: it only reads the scratch files), so a long upload
never holds the VM's other loops. The manifest is written last: a backup is complete in
the bucket exactly when its manifest exists.
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from virtfleet.agent.agent import COMPONENT, Agent, key_of
from virtfleet.agent.backups import left, upload
from virtfleet.agent.backups.inplace import InPlaceRestores
from virtfleet.agent.backups.observe import (
    clean,
    delete_scratch,
    parents_of,
    scratch_present,
    writable_disks,
)
from virtfleet.agent.backups.state import BackupDisk, BackupMemo, scratch_name
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.snapshot.store import ObjectStore
from virtfleet.api.backup import (
    BackupPhase,
    BackupProgress,
    VMBackupLocationSpec,
    VMBackupSpec,
    VMBackupStatus,
)
from virtfleet.api.conditions import ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.snapshot import SnapshotError
from virtfleet.backupstore.s3 import (
    MANIFEST,
    TRANSFER_WORKERS,
    BackupBucket,
    StoreError,
    backup_prefix,
)
from virtfleet.domain.jobs import JobOperation, JobType
from virtfleet.hypervisor import DomainEvent, EventKind, backup, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.logs import get_logger
from virtfleet.reconcile import backup as rules
from virtfleet.reconcile.vm_model import EventNote
from virtfleet.runtime.failures import cache_reporter
from virtfleet.runtime.kube import KubeError
from virtfleet.runtime.locations import location_state, open_bucket, open_location
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.versions import store_newest


def _with(status: VMBackupStatus, **changes: Any) -> VMBackupStatus:
    return status.model_copy(update=changes)


class BackupAgent:
    def __init__(self, agent: Agent, locks: VmLocks) -> None:
        self.agent = agent
        self.locks = locks
        self.hv = agent.hv
        self.kube = agent.kube
        self.settings = agent.settings
        self.node = agent.settings.node_name
        self.backups: dict[Key, dict[str, Any]] = {}
        self.memos: dict[str, BackupMemo] = {}
        self.queue: WorkQueue[Key] = WorkQueue(
            name="vmbackups",
            workers=2,
            on_error=cache_reporter(self.kube, "VMBackup", COMPONENT, self.backups, cas=True),
        )
        self.log = get_logger("virtfleet.agent.backups", node=self.node)
        self.store = ObjectStore(
            self.kube,
            "VMBackup",
            self.backups,
            node=self.node,
            finalizer=self.settings.finalizer,
            log=self.log,
        )
        #: Parts in flight (each in memory) across all this node's uploads.
        self.transfer_gate = asyncio.Semaphore(TRANSFER_WORKERS)
        self.restores = InPlaceRestores(self)
        agent.start_holds.append(self.restores.held)
        agent.on_forget(self.vm_left)
        self.left_tasks: set[asyncio.Task[None]] = set()

    # --- signals → keys ---------------------------------------------------------------

    def on_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.backups.pop(key, None)
            self.queue.forget(key)
            memo = self.memos.pop(str(body["metadata"].get("uid")), None)
            if memo is not None and memo.upload is not None:
                memo.upload.cancel()
            return
        if not store_newest(self.backups, key, body):
            return  # older than what our own write already cached
        if self._vm_of(body) is not None:
            self.queue.add(key)
        for rkey, restore in self.restores.restores.items():
            if rkey[0] == key[0] and restore["spec"].get("backupName") == key[1]:
                self.restores.queue.add(rkey)

    def vm_left(self, vm_key: Key) -> None:
        left.stop_backups(self, vm_key)

    def on_vm_event(self, key: Key) -> None:
        self.restores.on_vm_event(key)
        for bkey, body in self.backups.items():
            if bkey[0] == key[0] and (body.get("spec") or {}).get("vmName") == key[1]:
                self.queue.add(bkey)

    async def on_domain_event(self, event: DomainEvent) -> None:
        """A job of a domain ended: look at its VM's running backups now, not at the next
        poll (a backup job of a few seconds otherwise waited up to a second more)."""
        if event.event != EventKind.JOB_COMPLETED:
            return
        for key, body in self.backups.items():
            status = body.get("status") or {}
            if status.get("vmUID") == event.uuid and status.get("phase") in (
                BackupPhase.IN_PROGRESS.value,
                BackupPhase.UPLOADING.value,
            ):
                self.queue.add(key)

    def resync(self) -> None:
        for key, body in self.backups.items():
            if self._vm_of(body) is not None:
                self.queue.add(key)
        for key in self.restores.restores:
            self.restores.queue.add(key)

    def bookkeeping(self) -> dict[str, int]:
        return {
            "backups": len(self.backups),
            "backup_memos": len(self.memos),
            "backup_restores": len(self.restores.restores),
            "backup_restore_memos": len(self.restores.memos),
        }

    def _vm_of(self, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        namespace = str(body["metadata"].get("namespace"))
        vm = self.agent.cache.get((namespace, str((body.get("spec") or {}).get("vmName", ""))))
        return vm if vm is not None and self.agent.is_mine(vm) else None

    # --- the loop ---------------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        body = self.backups.get(key)
        if body is None:
            return None
        vm = self._vm_of(body)
        if vm is None:
            return None
        vm_key = (key[0], str(body["spec"]["vmName"]))
        async with self.locks.lock(vm_key):
            for _ in range(8):
                again = await self._pass(key, vm)
                if again is None or again > 0:
                    return again
        return 0.5

    async def _pass(self, key: Key, vm: Mapping[str, Any]) -> float | None:
        body = self.backups[key]
        meta = body["metadata"]
        view = rules.BackupView(
            name=key[1],
            namespace=key[0],
            uid=str(meta["uid"]),
            spec=VMBackupSpec.model_validate(body["spec"]),
            status=VMBackupStatus.model_validate(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
        )
        memo = self.memos.setdefault(view.uid, BackupMemo())
        log = self.log.bind(namespace=key[0], vmbackup=key[1], vm=vm["metadata"]["name"])
        if view.deleting:
            await self._abandon(view, vm, memo, log)
            return None
        assert view.spec is not None
        vm_uid = str(vm["metadata"]["uid"])
        guest = await self.hv.lookup(vm_uid)
        running = guest is not None and await guest.is_active()
        location, unavailable = await location_state(self.kube, key[0], view.spec.location)
        taken = None
        if view.status.phase in (None, BackupPhase.PENDING) and location and not unavailable:
            taken = await self._taken(key, location)
        checkpoints = tuple(await backup.checkpoint_names(guest)) if running and guest else ()
        job_active = False
        if running and guest is not None and memo.job_started and memo.job_outcome is None:
            job = await backup.running_job(guest)
            job_active = job.active
            if not job_active:
                finished = await backup.completed_job(guest)
                ok = (
                    finished is not None
                    and finished.type == JobType.COMPLETED
                    and finished.operation == JobOperation.BACKUP
                )
                memo.job_outcome = rules.Outcome.SUCCEEDED if ok else rules.Outcome.FAILED
                memo.job_error = None if ok else (finished.error_message if finished else None)
                log.info(
                    "backup job ended",
                    outcome=memo.job_outcome.value,
                    seconds=round(time.monotonic() - memo.started_at, 3),
                    error=memo.job_error,
                )
        disks = await writable_disks(self.settings, vm, guest) if guest is not None else []
        scratch, pool_busy = await scratch_present(self.hv, vm_uid, view.uid, disks)
        seen = rules.Observed(
            vm_uid=vm_uid,
            running=running,
            location_found=location is not None,
            location_available=unavailable is None,
            location_message=unavailable or "",
            checkpoints=checkpoints,
            job_active=job_active,
            job_outcome=memo.job_outcome,
            job_error=memo.job_error,
            scratch_present=scratch,
            upload_running=memo.upload is not None and not memo.upload.done(),
            upload_outcome=memo.upload_outcome,
            upload_error=memo.upload_error,
            parents=parents_of(self.backups, view, vm_uid),
            has_disks=bool(disks) or guest is None,
            defined=guest is not None,
            prefix_taken=taken,
            pool_busy=pool_busy,
            retry_in=max(0.0, memo.not_before - time.monotonic()),
        )
        action = rules.decide(view, seen)
        log.debug("backup decision", action=type(action).__name__)
        status = view.status.model_copy(deep=True)
        now = rfc3339(datetime.now(UTC))
        match action:
            case rules.Nothing():
                return None
            case rules.Recheck(seconds=seconds):
                return seconds
            case rules.Wait(seconds=seconds, reason=reason, message=message):
                status = _with(status, phase=BackupPhase.PENDING)
                status = _with(
                    status,
                    conditions=kstatus_conditions(
                        status.conditions,
                        meta.get("generation"),
                        ready=(ConditionStatus.FALSE, reason, message),
                        reconciling=(reason, message),
                        stalled=None,
                    ),
                )
                await self.store.write_status(key, body, status)
                return seconds
            case rules.Claim():
                # The node label only: no ownerReference to the VM, unlike a snapshot, so
                # deleting the VM never garbage-collects its off-node backups with it.
                if not await self.store.label_for_node(key):
                    return 0.5
                status = _with(status, phase=BackupPhase.IN_PROGRESS)
                status = _with(status, type=action.type)
                status = _with(status, parent=action.parent.name if action.parent else None)
                status = _with(status, checkpoint=action.checkpoint)
                status = _with(status, node_name=self.node)
                status = _with(status, vm_uid=vm_uid)
                status = _with(status, attempt=1)
                status = _with(status, start_time=now)
                status = _with(
                    status,
                    object_prefix=backup_prefix(
                        location.prefix if location else "", key[0], key[1]
                    ),
                )
                status = self._set_conditions(
                    status, meta, "BackupInProgress", "the backup job runs"
                )
                ok = await self.store.write_status(key, self.backups[key], status, cas=True)
                return 0.0 if ok else 0.5
            case rules.StartJob():
                assert guest is not None
                for stale in action.stale_checkpoints:
                    await backup.delete_checkpoint(guest, stale)
                targets = [
                    backup.BackupTarget(
                        d.dev,
                        posixpath.join(
                            posixpath.dirname(d.path), scratch_name(vm_uid, d.name, view.uid)
                        ),
                    )
                    for d in disks
                ]
                try:
                    await backup.begin(
                        guest,
                        targets,
                        incremental_from=action.incremental_from,
                        checkpoint=action.checkpoint,
                    )
                except hv_errors.HypervisorError as exc:
                    memo.job_started, memo.job_outcome, memo.job_error = (
                        True,
                        rules.Outcome.FAILED,
                        str(exc),
                    )
                    return 0.0
                memo.job_started, memo.job_outcome, memo.job_error = True, None, None
                memo.started_at = time.monotonic()
                log.info("backup job started", incremental_from=action.incremental_from)
                return rules.FIRST_POLL_SECONDS
            case rules.CopyVolumes():
                # Under the VM's lock (reconcile holds it): the VM cannot start meanwhile.
                started = time.monotonic()
                try:
                    for d in disks:
                        await storage.copy_flat(
                            self.hv,
                            d.pool,
                            posixpath.basename(d.path),
                            scratch_name(vm_uid, d.name, view.uid),
                        )
                except hv_errors.HypervisorError as exc:
                    memo.job_outcome, memo.job_error = rules.Outcome.FAILED, str(exc)
                    log.warning("volumes not copied", error=str(exc))
                    return 0.0
                memo.job_outcome, memo.job_error = rules.Outcome.SUCCEEDED, None
                log.info("volumes copied", seconds=round(time.monotonic() - started, 3))
                return 0.0
            case rules.ReportProgress():
                if status.phase == BackupPhase.IN_PROGRESS and guest is not None:
                    running_now = await backup.running_job(guest)
                    total, done = (
                        running_now.disk_total or running_now.data_total,
                        running_now.disk_processed or running_now.data_processed,
                    )
                    pct = int(50 * done / total) if total else 0
                else:
                    total, done = memo.upload_total, memo.upload_done
                    pct = 50 + (int(50 * done / total) if total else 0)
                status = _with(
                    status,
                    progress=BackupProgress(
                        bytes_total=total, bytes_done=done, percent=min(pct, 99)
                    ),
                )
                now_s = time.monotonic()
                if now_s - memo.progress_written >= rules.PROGRESS_POLL_SECONDS:
                    # At most one progress write a second, however often the job is polled.
                    await self.store.write_status(key, body, status)
                    memo.progress_written = now_s
                if status.phase == BackupPhase.UPLOADING:
                    return rules.PROGRESS_POLL_SECONDS  # the upload's end queues it anyway
                return rules.poll_seconds(now_s - memo.started_at)
            case rules.StartUpload():
                if status.phase != BackupPhase.UPLOADING:
                    status = _with(status, phase=BackupPhase.UPLOADING)
                    status = self._set_conditions(
                        status, meta, "Uploading", "uploading to the bucket"
                    )
                    if not await self.store.write_status(key, body, status, cas=True):
                        return 0.5
                memo.upload_outcome, memo.upload_error = None, None
                memo.started_at = time.monotonic()
                guest_xml = await guest.xml() if guest is not None else ""
                memo.upload = asyncio.create_task(
                    self._upload(key, view, vm, vm_uid, disks, guest_xml, memo),
                    name=f"backup-upload-{key[1]}",
                )
                return rules.PROGRESS_POLL_SECONDS
            case rules.Complete():
                if guest is not None and action.drop_checkpoint:
                    await backup.delete_checkpoint(guest, action.drop_checkpoint)
                await delete_scratch(self.hv, vm_uid, view.uid, disks)
                status = _with(status, phase=BackupPhase.COMPLETED)
                status = _with(status, completion_time=now)
                status = _with(status, disks=memo.disks)
                status = _with(status, size_bytes=sum(d.virtual_size or 0 for d in memo.disks))
                status = _with(
                    status, uploaded_bytes=sum(d.uploaded_bytes or 0 for d in memo.disks)
                )
                status = _with(
                    status,
                    progress=BackupProgress(
                        bytes_total=status.uploaded_bytes,
                        bytes_done=status.uploaded_bytes,
                        percent=100,
                    ),
                )
                status = _with(status, error=None)
                status = _with(
                    status,
                    conditions=kstatus_conditions(
                        status.conditions,
                        meta.get("generation"),
                        ready=(
                            ConditionStatus.TRUE,
                            "Completed",
                            f"{status.type} backup completed",
                        ),
                        reconciling=None,
                        stalled=None,
                    ),
                )
                if await self.store.write_status(key, body, status, cas=True):
                    self.memos.pop(view.uid, None)
                    await self._event(
                        body,
                        "Normal",
                        "BackupCompleted",
                        (f"{status.type} backup of {status.uploaded_bytes} bytes completed"),
                    )
                return None
            case rules.Retry():
                await clean(self.hv, guest, vm_uid, view.uid, disks, action.drop_checkpoint)
                self.memos[view.uid] = BackupMemo(not_before=time.monotonic() + action.delay)
                status = _with(status, phase=action.phase)
                status = _with(status, attempt=(status.attempt or 0) + 1)
                status = _with(status, error=SnapshotError(message=action.message, time=now))
                await self._event(
                    body, "Warning", "BackupRetry", (f"attempt {status.attempt}: {action.message}")
                )
                await self.store.write_status(key, body, status, cas=True)
                return action.delay
            case rules.Fail(reason=reason, message=message):
                await clean(self.hv, guest, vm_uid, view.uid, disks, action.drop_checkpoint)
                self.memos.pop(view.uid, None)
                status = _with(status, phase=BackupPhase.FAILED)
                status = _with(status, error=SnapshotError(message=message, time=now))
                status = _with(status, completion_time=now)
                status = _with(
                    status,
                    conditions=kstatus_conditions(
                        status.conditions,
                        meta.get("generation"),
                        ready=(ConditionStatus.FALSE, reason, message),
                        reconciling=None,
                        stalled=(reason, message),
                    ),
                )
                await self.store.write_status(key, body, status, cas=True)
                await self._event(body, "Warning", reason, message)
                return None
        return None

    # --- helpers ----------------------------------------------------------------------

    def _set_conditions(
        self, status: VMBackupStatus, meta: Mapping[str, Any], reason: str, message: str
    ) -> VMBackupStatus:
        return _with(
            status,
            conditions=kstatus_conditions(
                status.conditions,
                meta.get("generation"),
                ready=(ConditionStatus.FALSE, reason, message),
                reconciling=(reason, message),
                stalled=None,
            ),
        )

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, msg: str) -> None:
        await self.store.record_events(body, [EventNote(type_, reason, msg)])

    async def _taken(self, key: Key, location: VMBackupLocationSpec) -> bool | None:
        """Whether the bucket already holds a backup by this name (retained from a deleted
        VMBackup, or another cluster's): None when the store could not tell. The location
        is the one this pass read (not fetched again)."""
        try:
            got = await open_bucket(self.kube, key[0], location)
        except StoreError as exc:
            self.log.info("bucket not opened", vmbackup=key[1], error=exc.message)
            return None
        manifest = backup_prefix(location.prefix, key[0], key[1]) + MANIFEST
        try:
            size = await asyncio.get_running_loop().run_in_executor(None, got.object_size, manifest)
        except StoreError as exc:
            self.log.info("bucket not asked", vmbackup=key[1], error=exc.message)
            return None
        finally:
            got.close()
        return size is not None

    async def _location(
        self, namespace: str, name: str
    ) -> tuple[VMBackupLocationSpec | None, BackupBucket | str]:
        return await open_location(self.kube, namespace, name)

    async def _abandon(
        self, view: rules.BackupView, vm: Mapping[str, Any], memo: BackupMemo, log: Any
    ) -> None:
        """A backup deleted before it completed: stop its job and upload, drop its traces."""
        if view.status.phase in (BackupPhase.COMPLETED, BackupPhase.FAILED, None):
            return
        if memo.upload is not None:
            memo.upload.cancel()
        vm_uid = str(vm["metadata"]["uid"])
        guest = await self.hv.lookup(vm_uid)
        own = rules.checkpoint_name(view.uid)
        await clean(
            self.hv, guest, vm_uid, view.uid, await writable_disks(self.settings, vm, guest), own
        )
        self.memos.pop(view.uid, None)
        log.info("unfinished backup abandoned")

    async def _upload(
        self,
        key: Key,
        view: rules.BackupView,
        vm: Mapping[str, Any],
        vm_uid: str,
        disks: list[BackupDisk],
        domain_xml: str,
        memo: BackupMemo,
    ) -> None:
        """The upload task: :mod:`.upload`'s steps, its outcome kept for the next pass."""
        assert view.spec is not None
        log = self.log.bind(namespace=key[0], vmbackup=key[1])
        bucket: BackupBucket | None = None
        try:
            location, got = await self._location(key[0], view.spec.location)
            if not isinstance(got, BackupBucket):
                raise StoreError("LocationUnavailable", got)
            bucket = got
            results = await upload.upload_backup(
                self.hv,
                bucket,
                location.prefix if location else "",
                key,
                view.uid,
                VMBackupStatus.model_validate(self.backups[key].get("status") or {}),
                node=self.node,
                vm=vm,
                vm_uid=vm_uid,
                disks=disks,
                domain_xml=domain_xml,
                memo=memo,
                gate=self.transfer_gate,
            )
            memo.disks = [r.status for r in results]
            memo.upload_outcome = rules.Outcome.SUCCEEDED
            log.info(
                "backup uploaded",
                bytes=sum(r.parts.length for r in results),
                seconds=round(time.monotonic() - memo.started_at, 3),
            )
        except asyncio.CancelledError:
            raise
        except (StoreError, hv_errors.HypervisorError, KubeError) as exc:
            memo.upload_outcome = rules.Outcome.FAILED
            memo.upload_error = getattr(exc, "message", None) or str(exc)
            log.warning("backup upload failed", error=memo.upload_error)
        except Exception as exc:  # a bug or an unforeseen library error: an attempt all the same
            memo.upload_outcome = rules.Outcome.FAILED
            memo.upload_error = f"{type(exc).__name__}: {exc}"
            log.exception("backup upload failed unexpectedly")
        finally:
            if bucket is not None:
                bucket.close()
            self.queue.add(key)


__all__ = ["BackupAgent"]
