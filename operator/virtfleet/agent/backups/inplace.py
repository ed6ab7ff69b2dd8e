"""Restores from a backup into the existing VM they were taken of, on the VM's node:
observe → :func:`virtfleet.reconcile.backup_inplace.decide_in_place` → act.

The chain is fetched and joined off the VM's lock (a task: it may take minutes); the
disks are replaced under it. While a restore is ``InProgress`` the agent holds the VM
stopped (:meth:`InPlaceRestores.held`, read by the VM loop).
"""

from __future__ import annotations

import asyncio
import functools
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtfleet.agent.agent import COMPONENT, key_of
from virtfleet.agent.backupdisk import fetch_flat
from virtfleet.agent.backups.observe import writable_disks
from virtfleet.agent.backups.state import BackupDisk
from virtfleet.agent.snapshot.store import ObjectStore
from virtfleet.agent.snapshot.views import newer
from virtfleet.api.conditions import ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.snapshot import RestorePhase, SnapshotError, VMRestoreStatus
from virtfleet.backupstore.s3 import BackupBucket, StoreError
from virtfleet.hypervisor import Guest, backup, images, snapshots, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import NODE_LABEL, Key
from virtfleet.logs import get_logger
from virtfleet.reconcile import backup_inplace as rules
from virtfleet.reconcile.backup import Outcome
from virtfleet.reconcile.backup_control import RESTORE_UID
from virtfleet.reconcile.vm_model import EventNote
from virtfleet.runtime.failures import cache_reporter
from virtfleet.runtime.kube import KubeError
from virtfleet.runtime.locations import open_location
from virtfleet.runtime.queue import WorkQueue

if TYPE_CHECKING:
    from virtfleet.agent.backups.loop import BackupAgent


@dataclass
class FetchMemo:
    """What this process fetched for one restore (lost on restart: fetched again)."""

    task: asyncio.Task[None] | None = None
    outcome: Outcome | None = None
    error: str | None = None
    spool: Path | None = None
    flat: dict[str, Path] = field(default_factory=dict)
    replaced: bool = False
    replace_error: str | None = None
    #: Set to stop the download threads (a cancelled task does not stop them).
    stop: threading.Event = field(default_factory=threading.Event)
    #: Monotonic time before which the next attempt does not start (a retry's back-off).
    not_before: float = 0.0

    def discard(self) -> None:
        self.stop.set()
        if self.task is not None:
            self.task.cancel()
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)


class InPlaceRestores:
    def __init__(self, owner: BackupAgent) -> None:
        self.owner = owner
        self.agent = owner.agent
        self.hv = owner.hv
        self.kube = owner.kube
        self.node = owner.node
        self.restores: dict[Key, dict[str, Any]] = {}
        self.memos: dict[str, FetchMemo] = {}
        self.log = get_logger("virtfleet.agent.backups.inplace", node=self.node)
        self.queue: WorkQueue[Key] = WorkQueue(
            name="backup-restores",
            workers=2,
            on_error=cache_reporter(self.kube, "VMRestore", COMPONENT, self.restores, cas=True),
        )
        self.store = ObjectStore(
            self.kube,
            "VMRestore",
            self.restores,
            node=self.node,
            finalizer=owner.settings.finalizer,
            log=self.log,
        )

    async def preload(self, attempts: int = 30) -> None:
        """Before the VM loop starts: this node's restores (committed ones carry its label),
        so that a VM held by one is not started in the moment before the watch brings it
        (after a crash between a replacement and its status write, a start then would let
        the guest write what the replacement's repetition overwrites). Without them the
        agent does not start (kopf restarts it)."""
        for attempt in range(1, attempts + 1):
            try:
                found = await self.kube.list(
                    "VMRestore", label_selector=f"{NODE_LABEL}={self.node}"
                )
                break
            except KubeError as exc:
                if attempt == attempts:
                    raise
                self.log.warning("restores not listed yet", attempt=attempt, error=str(exc))
                await asyncio.sleep(1.0)
        for body in found:
            if (body.get("spec") or {}).get("backupName"):
                self.restores.setdefault(key_of(body), dict(body))

    # --- signals ------------------------------------------------------------------------

    def on_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if not (body.get("spec") or {}).get("backupName"):
            return  # a snapshot restore: the snapshot loops'
        key = key_of(body)
        if event_type == "DELETED":
            self.restores.pop(key, None)
            self.queue.forget(key)
            memo = self.memos.pop(str(body["metadata"].get("uid")), None)
            if memo is not None:
                memo.discard()
            self._wake_vm(body)
            return
        if not newer(self.restores.get(key), body):
            return  # our own newer write is already cached
        self.restores[key] = dict(body)
        if self._vm_of(body) is not None:
            self.queue.add(key)

    def on_vm_event(self, key: Key) -> None:
        for rkey, body in self.restores.items():
            if rkey[0] == key[0] and body["spec"].get("vmName") == key[1]:
                self.queue.add(rkey)

    def held(self, vm_key: Key) -> str | None:
        """Why the VM must stay stopped: a restore is replacing its disks, or one failed
        after it began replacing them (until that VMRestore is deleted)."""
        vm = self.agent.cache.get(vm_key)
        uid = vm["metadata"].get("uid") if vm is not None else None
        for (namespace, name), body in self.restores.items():
            status = body.get("status") or {}
            if namespace != vm_key[0] or not uid or status.get("vmUID") != uid:
                continue
            backup_name = body["spec"]["backupName"]
            if status.get("phase") == RestorePhase.IN_PROGRESS.value:
                return (
                    f"its disks are being restored from VMBackup {backup_name} (VMRestore {name})"
                )
            if status.get("phase") == RestorePhase.FAILED.value and status.get("disksReplacing"):
                return (
                    f"VMRestore {name} failed while replacing its disks from VMBackup "
                    f"{backup_name}; delete that VMRestore to boot the disks as they are"
                )
        return None

    def _vm_of(self, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The VM this restore replaces the disks of, if it lives here and was not made by
        this restore (a restore as a new VM is the controller's)."""
        vm = self.agent.cache.get((key_of(body)[0], str(body["spec"].get("vmName", ""))))
        if vm is None or not self.agent.is_mine(vm):
            return None
        made_by = (vm["metadata"].get("annotations") or {}).get(RESTORE_UID)
        return None if made_by == body["metadata"].get("uid") else vm

    def _wake_vm(self, body: Mapping[str, Any]) -> None:
        vm_key = (key_of(body)[0], str((body.get("spec") or {}).get("vmName", "")))
        if vm_key in self.agent.cache:
            self.agent.queue.add(vm_key)

    # --- the loop -----------------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        body = self.restores.get(key)
        if body is None:
            return None
        vm = self._vm_of(body)
        if vm is None:
            return None
        async with self.owner.locks.lock(key_of(vm)):
            for _ in range(6):
                again = await self._pass(key, vm)
                if again is None or again > 0:
                    return again
        return 0.5

    async def _pass(self, key: Key, vm: Mapping[str, Any]) -> float | None:
        body = self.restores[key]
        meta, spec = body["metadata"], body["spec"]
        status = VMRestoreStatus.model_validate(body.get("status") or {})
        uid = str(meta["uid"])
        memo = self.memos.setdefault(uid, FetchMemo())
        log = self.log.bind(namespace=key[0], vmrestore=key[1], vm=spec["vmName"])
        vm_uid = str(vm["metadata"]["uid"])
        guest = await self.hv.lookup(vm_uid)
        disks = await writable_disks(self.owner.settings, vm, guest)
        view = rules.InPlaceView(
            name=key[1],
            vm_name=str(spec["vmName"]),
            backup_name=str(spec["backupName"]),
            phase=status.phase,
            attempt=status.attempt or 0,
            replacing=bool(status.disks_replacing),
        )
        seen = rules.InPlaceObserved(
            backup=self._backup_facts(key[0], view.backup_name),
            domain_active=guest is not None and await guest.is_active(),
            vm_disks=tuple(d.name for d in disks),
            snapshots=len(await snapshots.list_snapshots(guest)) if guest is not None else 0,
            fetch_running=memo.task is not None and not memo.task.done(),
            fetch_outcome=memo.outcome,
            fetch_error=memo.error,
            replaced=memo.replaced,
            replace_error=memo.replace_error,
            retry_in=max(0.0, memo.not_before - time.monotonic()),
        )
        action = rules.decide_in_place(view, seen)
        log.debug("in-place restore decision", action=type(action).__name__)
        now = rfc3339(datetime.now(UTC))
        match action:
            case rules.Nothing():
                return None
            case rules.Wait(reason=reason, message=message, seconds=seconds):
                # A committed restore stays InProgress (the VM stays held); the VM's uid
                # says which VM it is for (the controller fails it if that VM goes).
                phase = status.phase or RestorePhase.PENDING
                status = status.model_copy(update={"phase": phase, "vm_uid": vm_uid})
                await self._write(key, body, status, reason, message)
                return seconds
            case rules.Commit(disks=names):
                if not await self.store.label_for_node(key):
                    return 0.5
                status = status.model_copy(
                    update={
                        "phase": RestorePhase.IN_PROGRESS,
                        "attempt": 1,
                        "start_time": now,
                        "node_name": self.node,
                        "vm_uid": vm_uid,
                    }
                )
                message = f"replacing disks {', '.join(names)} (the VM is held stopped)"
                ok = await self._write(key, self.restores[key], status, "Restoring", message, True)
                if ok:
                    await self._event(body, "Normal", "RestoreStarted", message)
                return 0.0 if ok else 0.5
            case rules.Fetch(disks=names):
                memo.discard()
                memo = self.memos[uid] = FetchMemo()
                memo.task = asyncio.create_task(
                    self._fetch(key, view.backup_name, names, memo), name=f"restore-{key[1]}"
                )
                return None  # the fetch's end queues it
            case rules.Replace(disks=names):
                assert guest is not None
                if any(name not in memo.flat for name in names):
                    memo.outcome = None  # a disk joined since the fetch: fetch again
                    return 0.0
                if not status.disks_replacing:
                    # Recorded before the first volume is touched: from here a failure can
                    # no longer say the disks are as they were.
                    status = status.model_copy(update={"disks_replacing": True})
                    message = f"replacing disks {', '.join(names)}"
                    if not await self._write(key, body, status, "Restoring", message, True):
                        return 0.5
                try:
                    await self._replace(guest, [d for d in disks if d.name in names], memo, log)
                except hv_errors.HypervisorError as exc:
                    memo.replace_error = f"replacing the disks: {exc}"
                    log.warning("disks not replaced", error=str(exc))
                    return 0.0
                memo.replaced = True
                return 0.0
            case rules.Done(message=message):
                status = status.model_copy(
                    update={
                        "phase": RestorePhase.SUCCEEDED,
                        "complete": True,
                        "restore_time": now,
                        "error": None,
                    }
                )
                if await self._write(key, body, status, "Succeeded", message, True, done=True):
                    self._finish(uid, body)
                    await self._event(body, "Normal", "Restored", message)
                return None
            case rules.Later(seconds=seconds):
                return seconds
            case rules.Retry(message=message, seconds=seconds):
                self._finish(uid, None)
                self.memos[uid] = FetchMemo(not_before=time.monotonic() + seconds)
                status = status.model_copy(
                    update={
                        "attempt": (status.attempt or 0) + 1,
                        "error": SnapshotError(message=message, time=now),
                    }
                )
                await self._write(key, body, status, "Restoring", f"retrying: {message}", True)
                await self._event(body, "Warning", "RestoreRetry", message)
                return seconds
            case rules.Fail(reason=reason, message=message):
                status = status.model_copy(
                    update={
                        "phase": RestorePhase.FAILED,
                        "complete": False,
                        "error": SnapshotError(message=message, time=now),
                    }
                )
                if await self._write(key, body, status, reason, message, True, failed=True):
                    self._finish(uid, body)
                    await self._event(body, "Warning", reason, message)
                return None
        return None

    async def _replace(
        self, guest: Guest, disks: list[BackupDisk], memo: FetchMemo, log: Any
    ) -> None:
        """Under the VM's lock: checkpoints forgotten, each disk's volume replaced."""
        await backup.forget_checkpoints(guest)
        for disk in disks:
            stored = await storage.upload_file(
                self.hv, disk.pool, posixpath.basename(disk.path), str(memo.flat[disk.name])
            )
            if stored.format != "qcow2" or stored.backing_path is not None:
                raise hv_errors.UnsafeImage(f"disk {disk.name}: not a plain qcow2")
            log.info("disk replaced from backup", disk=disk.name, bytes=stored.allocation)

    def _finish(self, uid: str, body: Mapping[str, Any] | None) -> None:
        memo = self.memos.pop(uid, None)
        if memo is not None:
            memo.discard()
        if body is not None:
            self._wake_vm(body)  # the hold is over: the run strategy decides again

    async def _fetch(
        self, key: Key, backup_name: str, names: tuple[str, ...], memo: FetchMemo
    ) -> None:
        """The chain of every disk, checked and joined into one qcow2 each (no lock held)."""
        bucket: BackupBucket | None = None
        try:
            backup_body = self.owner.backups.get((key[0], backup_name)) or {}
            location = str((backup_body.get("spec") or {}).get("location", ""))
            prefix = str((backup_body.get("status") or {}).get("objectPrefix") or "")
            _, got = await open_location(self.kube, key[0], location)
            if not isinstance(got, BackupBucket):
                raise StoreError("LocationUnavailable", got)
            bucket = got
            memo.spool = Path(
                tempfile.mkdtemp(
                    prefix=f"inplace-{key[1]}-", dir=self.owner.settings.download_dir or None
                )
            )
            for name in names:
                flat, _ = await fetch_flat(bucket, prefix, name, memo.spool, memo.stop)
                info = await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(images.inspect, str(flat))
                )
                if info.format != "qcow2":
                    raise hv_errors.UnsafeImage(f"disk {name}: the joined chain is {info.format}")
                memo.flat[name] = flat
            memo.outcome = Outcome.SUCCEEDED
        except asyncio.CancelledError:
            raise
        except (StoreError, hv_errors.HypervisorError, KubeError, OSError) as exc:
            memo.outcome = Outcome.FAILED
            memo.error = getattr(exc, "message", None) or str(exc)
            self.log.warning("restore fetch failed", vmrestore=key[1], error=memo.error)
        except Exception as exc:  # unforeseen: an attempt all the same, with the traceback
            memo.outcome = Outcome.FAILED
            memo.error = f"{type(exc).__name__}: {exc}"
            self.log.exception("restore fetch failed unexpectedly", vmrestore=key[1])
        finally:
            if bucket is not None:
                bucket.close()
            self.queue.add(key)

    def _backup_facts(self, namespace: str, name: str) -> rules.BackupFacts | None:
        body = self.owner.backups.get((namespace, name))
        if body is None:
            return None
        status = body.get("status") or {}
        return rules.BackupFacts(
            phase=status.get("phase"),
            vm_name=str((body.get("spec") or {}).get("vmName", "")),
            deleting=bool(body["metadata"].get("deletionTimestamp")),
            disks=tuple(str(d.get("name")) for d in status.get("disks") or []),
        )

    async def _write(
        self,
        key: Key,
        body: Mapping[str, Any],
        status: VMRestoreStatus,
        reason: str,
        message: str,
        cas: bool = False,
        *,
        done: bool = False,
        failed: bool = False,
    ) -> bool:
        generation = body["metadata"].get("generation")
        ready = ConditionStatus.TRUE if done else ConditionStatus.FALSE
        status = status.model_copy(
            update={
                "conditions": kstatus_conditions(
                    status.conditions,
                    generation,
                    ready=(ready, reason, message),
                    reconciling=None if done or failed else (reason, message),
                    stalled=(reason, message) if failed else None,
                )
            }
        )
        return await self.store.write_status(key, body, status, cas=cas)

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, msg: str) -> None:
        await self.store.record_events(body, [EventNote(type_, reason, msg)])
