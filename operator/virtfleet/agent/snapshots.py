"""The node agent's VMSnapshot and VMRestore loops: read → decide → act, per VM.

Same shape as the VM loop (:mod:`virtfleet.agent.agent`): kopf handlers only keep the
caches and enqueue keys; a worker observes the VM's domain, asks the pure functions of
:mod:`virtfleet.reconcile.snapshot` what to do, does it through the hypervisor adapter
and looks again until nothing is left.

Which agent acts: the one whose node holds the VM (the VM is in its cache, labelled and
placed for it). Snapshots are queued per snapshot; restores per *VM*, so all restores of
one VM are judged together and one at a time.

Coordination with the VM loop: every reconcile that touches a VM's domain (the VM loop,
a snapshot, a restore) holds that VM's :class:`VmLocks` lock, so the VM loop never
"heals" a domain a revert is in the middle of, and a snapshot is never taken while the
domain is being redefined, started or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from virtfleet import manifests
from virtfleet.agent.agent import COMPONENT, Agent, Key, _resource_version, key_of
from virtfleet.agent.driver import power_of, volume_name
from virtfleet.agent.locks import VmLocks as VmLocks  # re-exported for the loops
from virtfleet.agent.redefine import redefine_checked
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.conditions import parse_rfc3339
from virtfleet.api.snapshot import (
    RestorePhase,
    SnapshotPhase,
    VMRestoreSpec,
    VMRestoreStatus,
    VMSnapshotSpec,
    VMSnapshotStatus,
)
from virtfleet.api.virtualmachine import RunStrategy, VirtualMachineSpec
from virtfleet.domain.snapshot_check import UnsafeSnapshotError
from virtfleet.hypervisor import Guest, snapshots, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import API_GROUP, API_VERSION, NODE_LABEL
from virtfleet.logs import get_logger
from virtfleet.reconcile.snapshot import (
    MIGRATION_DONE_PHASES,
    Adopt,
    DeleteSnapshot,
    DestroyDomain,
    DomainFacts,
    LibvirtSnapshot,
    MarkDomain,
    RedefineSnapshot,
    RestoreAction,
    RestoreView,
    Revert,
    SnapshotAction,
    SnapshotRef,
    SnapshotView,
    StartDomain,
    TakeSnapshot,
    VmRef,
    active_restore,
    decide_restore,
    decide_snapshot,
    libvirt_snapshot_name,
    restore_action_failed,
    restore_order,
    snapshot_action_failed,
)
from virtfleet.reconcile.vm import EventNote
from virtfleet.runtime.failures import cache_reporter, error_reporter
from virtfleet.runtime.kube import Conflict, KubeError, NotFound
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch

MAX_PASSES = 8
#: A snapshot whose VM's lock is taken looks again this soon.
BUSY_RETRY_SECONDS = 0.5
#: Reason (Stalled condition, Event) of a stored snapshot XML that is refused.
UNSAFE_SNAPSHOT_XML = "UnsafeSnapshotXML"


class ActError(Exception):
    """An action failed; ``permanent`` when retrying cannot help."""

    def __init__(self, reason: str, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent


def _hv_error(exc: hv_errors.HypervisorError) -> ActError:
    transient = isinstance(exc, hv_errors.ConnectionLost)
    return ActError(type(exc).__name__, str(exc), permanent=not transient)


def _created(body: Mapping[str, Any]) -> datetime:
    raw = (body.get("metadata") or {}).get("creationTimestamp")
    if not raw:
        return datetime.now(UTC)
    return parse_rfc3339(str(raw))


def _invalid(exc: ValidationError) -> str:
    return "; ".join(
        f"spec.{manifests.field_path(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()
    )


def _newer(cached: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """Whether a watch event's ``body`` is not older than what the cache holds."""
    if cached is None:
        return True
    return _resource_version(body) >= _resource_version(cached)


def _owned_by(body: Mapping[str, Any], vm_uid: str) -> bool:
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == vm_uid for ref in refs)


class SnapshotAgent:
    """VMSnapshot and VMRestore handling of one node agent (see the module doc)."""

    def __init__(self, agent: Agent, locks: VmLocks) -> None:
        self.agent = agent
        self.locks = locks
        self.hv = agent.hv
        self.kube = agent.kube
        self.settings = agent.settings
        self.node = agent.settings.node_name
        self.snapshots: dict[Key, dict[str, Any]] = {}
        self.restores: dict[Key, dict[str, Any]] = {}
        self.snapshot_queue: WorkQueue[Key] = WorkQueue(
            name="vmsnapshots",
            workers=4,
            on_error=cache_reporter(self.kube, "VMSnapshot", COMPONENT, self.snapshots, cas=True),
        )
        #: Keyed by the *VM* (namespace, vm name): one restore of a VM at a time.
        self.restore_queue: WorkQueue[Key] = WorkQueue(
            name="vmrestores",
            workers=4,
            on_error=error_reporter(
                self.kube,
                "VMRestore",
                COMPONENT,
                lookup=self._open_restores,  # the error may be any of them: each says so
                store=self._keep_restore,
                cas=True,
            ),
        )
        self.finalized: dict[Key, asyncio.Event] = {}
        self.log = get_logger("virtfleet.agent.snapshots", node=self.node)

    def _keep_restore(self, _: Key, body: Mapping[str, Any]) -> None:
        if key_of(body) in self.restores:
            self.restores[key_of(body)] = dict(body)

    def _open_restores(self, vm_key: Key) -> list[dict[str, Any]]:
        """The unfinished restores of one VM (what the restore queue's key stands for)."""
        done = (RestorePhase.SUCCEEDED.value, RestorePhase.FAILED.value)
        return [
            body
            for key, body in self.restores.items()
            if key[0] == vm_key[0]
            and (body.get("spec") or {}).get("vmName") == vm_key[1]
            and (body.get("status") or {}).get("phase") not in done
        ]

    # --- signals → keys ---------------------------------------------------------------

    def on_snapshot_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.snapshots.pop(key, None)
            self.snapshot_queue.forget(key)
            self.finalized.pop(key, None)  # a later snapshot of the same name starts afresh
            self._restores_of(key[0], str((body.get("spec") or {}).get("vmName", "")))
            return
        if not _newer(self.snapshots.get(key), body):
            return  # our own newer write is already cached
        self.snapshots[key] = dict(body)
        if self._handles_snapshot(body):
            self.snapshot_queue.add(key)
        self._restores_of(key[0], str((body.get("spec") or {}).get("vmName", "")))

    def on_restore_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.restores.pop(key, None)
        elif _newer(self.restores.get(key), body):
            self.restores[key] = dict(body)
        self._restores_of(key[0], str((body.get("spec") or {}).get("vmName", "")))

    def on_vm_event(self, key: Key) -> None:
        """A VM changed (or arrived in the cache): look at its snapshots and restores."""
        for snap_key, body in self.snapshots.items():
            if snap_key[0] == key[0] and (body.get("spec") or {}).get("vmName") == key[1]:
                self.snapshot_queue.add(snap_key)
        self._restores_of(*key)

    def forget_vm(self, key: Key) -> None:
        """The VM left the node (deleted, migrated away): its restore queue state goes too.

        The restore queue is keyed by the VM; its VMRestores themselves go with their own
        DELETED events.
        """
        self.restore_queue.forget(key)

    def bookkeeping(self) -> dict[str, int]:
        """Entries per structure kept per object (what must return to 0 with the objects)."""
        return {
            "snapshots": len(self.snapshots),
            "snapshot_finalized": len(self.finalized),
            "snapshot_queue": self.snapshot_queue.tracked,
            "restores": len(self.restores),
            "restore_queue": self.restore_queue.tracked,
        }

    def resync(self) -> None:
        for key, body in self.snapshots.items():
            if self._handles_snapshot(body):
                self.snapshot_queue.add(key)
        for body in list(self.restores.values()):
            self._restores_of(str(body["metadata"]["namespace"]), str(body["spec"]["vmName"]))

    async def on_reconnect(self, reconnect: bool) -> None:
        self.resync()

    def _restores_of(self, namespace: str, vm_name: str) -> None:
        if (namespace, vm_name) in self.agent.cache:
            self.restore_queue.add((namespace, vm_name))

    def _vm_body(self, namespace: str, vm_name: str) -> Mapping[str, Any] | None:
        body = self.agent.cache.get((namespace, vm_name))
        if body is None or not self.agent.is_mine(body):
            return None
        return body

    def _handles_snapshot(self, body: Mapping[str, Any]) -> bool:
        """The VM is on this node; or it is gone and the snapshot is labelled for this node."""
        meta = body.get("metadata") or {}
        vm_name = str((body.get("spec") or {}).get("vmName", ""))
        if self._vm_body(str(meta.get("namespace")), vm_name) is not None:
            return True
        return (meta.get("labels") or {}).get(NODE_LABEL) == self.node and bool(
            meta.get("deletionTimestamp")
        )

    async def wait_snapshot_finalized(self, key: Key, timeout: float) -> bool:
        """For the kopf deletion handler: True once the libvirt snapshot is dealt with."""
        done = self.finalized.setdefault(key, asyncio.Event())
        self.snapshot_queue.add(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        return done.is_set()

    # --- views ------------------------------------------------------------------------

    def _vm_ref(self, body: Mapping[str, Any]) -> VmRef:
        meta = body["metadata"]
        try:
            strategy = VirtualMachineSpec.model_validate(body.get("spec") or {}).run_strategy
        except ValidationError:
            strategy = RunStrategy.MANUAL  # an invalid VM is never started by a restore
        return VmRef(
            name=str(meta["name"]),
            uid=str(meta["uid"]),
            run_strategy=strategy,
            deleting=bool(meta.get("deletionTimestamp")),
        )

    def _snapshot_view(self, body: Mapping[str, Any], vm_uid: str | None) -> SnapshotView:
        meta = body["metadata"]
        spec: VMSnapshotSpec | None = None
        invalid = None
        try:
            spec = VMSnapshotSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            invalid = _invalid(exc)
        adopted = (
            vm_uid is not None
            and _owned_by(body, vm_uid)
            and (meta.get("labels") or {}).get(NODE_LABEL) == self.node
            and self.settings.finalizer in (meta.get("finalizers") or [])
        )
        return SnapshotView(
            namespace=str(meta["namespace"]),
            name=str(meta["name"]),
            uid=str(meta["uid"]),
            generation=int(meta.get("generation", 1)),
            created=_created(body),
            spec=spec,
            status=VMSnapshotStatus.model_validate(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
            adopted=adopted,
            invalid=invalid,
        )

    def _restore_view(self, body: Mapping[str, Any], vm_uid: str) -> RestoreView:
        meta = body["metadata"]
        spec: VMRestoreSpec | None = None
        invalid = None
        try:
            spec = VMRestoreSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            invalid = _invalid(exc)
        return RestoreView(
            namespace=str(meta["namespace"]),
            name=str(meta["name"]),
            uid=str(meta["uid"]),
            generation=int(meta.get("generation", 1)),
            created=_created(body),
            spec=spec,
            status=VMRestoreStatus.model_validate(body.get("status") or {}),
            adopted=_owned_by(body, vm_uid),
            invalid=invalid,
        )

    def _snapshot_ref(self, namespace: str, name: str) -> SnapshotRef | None:
        body = self.snapshots.get((namespace, name))
        if body is None:
            return None
        status = VMSnapshotStatus.model_validate(body.get("status") or {})
        return SnapshotRef(
            name=name,
            vm_name=str((body.get("spec") or {}).get("vmName", "")),
            vm_uid=status.vm_uid,
            phase=status.phase,
            ready_to_use=bool(status.ready_to_use),
            libvirt_name=status.snapshot_name,
            memory_included=bool(status.memory_included),
            snapshot_xml=status.snapshot_xml,
            deleting=bool(body["metadata"].get("deletionTimestamp")),
        )

    # --- observing ------------------------------------------------------------------

    async def observe(
        self,
        vm_uid: str | None,
        name: str | None,
        *,
        want_xml: bool = False,
        vm_body: Mapping[str, Any] | None = None,
    ) -> tuple[DomainFacts, Guest | None]:
        """The VM's domain, after any job another (maybe dead) client started has ended."""
        guest = await self.hv.lookup(vm_uid) if vm_uid else None
        if guest is None:
            return DomainFacts(defined=False), None
        try:
            await snapshots.barrier(guest)
            state = await guest.status()
            power, _ = power_of(state.state, state.reason)
            info = await snapshots.get(guest, name) if name else None
            xml = (
                await snapshots.export(guest, name)
                if name is not None and info is not None and want_xml
                else None
            )
            marker = await snapshots.restore_marker(guest)
            current = await snapshots.current(guest)
        except hv_errors.NotFound:
            return DomainFacts(defined=False), None
        disks = await self._disks(vm_uid or "", vm_body) if info is not None and want_xml else ()
        return (
            DomainFacts(
                defined=True,
                power=power,
                reason=state.reason,
                snapshot=None
                if info is None
                else LibvirtSnapshot(info.name, info.state, info.has_memory, info.creation_time),
                snapshot_xml=xml,
                restore_marker=marker,
                current_snapshot=current.name if current else None,
                disks=disks,
            ),
            guest,
        )

    async def _disks(
        self, vm_uid: str, vm_body: Mapping[str, Any] | None
    ) -> tuple[tuple[str, int | None, int | None], ...]:
        if vm_body is None:
            return ()
        try:
            spec = VirtualMachineSpec.model_validate(vm_body.get("spec") or {})
        except ValidationError:
            return ()
        out = []
        for disk in spec.disks:
            pool = disk.pool or self.settings.default_pool
            try:
                volume = await storage.lookup_volume(self.hv, pool, volume_name(vm_uid, disk.name))
            except hv_errors.HypervisorError:
                volume = None
            out.append(
                (
                    disk.name,
                    volume.capacity if volume else None,
                    volume.allocation if volume else None,
                )
            )
        return tuple(out)

    # --- VMSnapshot -----------------------------------------------------------------

    async def reconcile_snapshot(self, key: Key) -> float | None:
        body = self.snapshots.get(key)
        if body is None:
            return None
        vm_key = (key[0], str((body.get("spec") or {}).get("vmName", "")))
        if self.locks.busy(vm_key):
            # Another loop, or another snapshot of the VM, works on its domain: look again
            # soon rather than hold one of the queue's few workers waiting for the lock. A
            # VM whose libvirt job is stuck (each call waits 30 s) and that had several
            # snapshots once held all of them, and no other VM's snapshot was taken.
            return BUSY_RETRY_SECONDS
        async with self.locks.lock(vm_key):
            return await self._reconcile_snapshot(key)

    async def _reconcile_snapshot(self, key: Key) -> float | None:
        log = self.log.bind(namespace=key[0], vmsnapshot=key[1])
        requeue: float | None = None
        for _ in range(MAX_PASSES):
            body = self.snapshots.get(key)
            if body is None:
                return None
            deleting = bool(body["metadata"].get("deletionTimestamp"))
            vm_body = self._vm_body(key[0], str((body.get("spec") or {}).get("vmName", "")))
            if vm_body is None and not deleting:
                return None  # not (or no longer) this node's business
            vm = self._vm_ref(vm_body) if vm_body is not None else None
            status = VMSnapshotStatus.model_validate(body.get("status") or {})
            vm_uid = status.vm_uid or (vm.uid if vm else None)
            view = self._snapshot_view(body, vm.uid if vm else None)
            name = status.snapshot_name or libvirt_snapshot_name(view.uid)
            dom, guest = await self.observe(
                vm_uid,
                name,
                want_xml=status.phase is not SnapshotPhase.READY,
                vm_body=vm_body,
            )
            blocked = await self._snapshot_blocked(key[0], vm) if vm else None
            now = datetime.now(UTC)
            decision = decide_snapshot(view, vm, dom, self.node, now, blocked_by=blocked)
            if decision.write_status_first and not await self._write_status(
                "VMSnapshot", key, body, decision.status, cas=True
            ):
                return 0.5  # someone else wrote meanwhile: decide again from fresh data
            if decision.actions:
                log.info("acting", actions=[type(a).__name__ for a in decision.actions])
            try:
                for action in decision.actions:
                    await self._act_snapshot(key, guest, view, action, vm)
            except ActError as exc:
                log.warning("snapshot action failed", reason=exc.reason, error=exc.message)
                if not exc.permanent:
                    return 5.0
                failed = snapshot_action_failed(view, decision.status, exc.reason, exc.message, now)
                await self._events(body, (EventNote("Warning", exc.reason, exc.message),))
                await self._write_status("VMSnapshot", key, body, failed)
                return None
            # After the actions: an Event such as SnapshotRedefined says what was done.
            await self._events(body, decision.events)
            if decision.finalized:
                if key in self.snapshots:  # not when its DELETED event came meanwhile
                    self.finalized.setdefault(key, asyncio.Event()).set()
                return None
            if not decision.write_status_first and not decision.transient:
                await self._write_status("VMSnapshot", key, body, decision.status)
            requeue = decision.requeue_after
            if not decision.actions and not decision.write_status_first:
                break
            if requeue:
                break
        return requeue

    async def _snapshot_blocked(self, namespace: str, vm: VmRef) -> str | None:
        busy = [
            key[1]
            for key, body in self.restores.items()
            if key[0] == namespace
            and (body.get("spec") or {}).get("vmName") == vm.name
            and (body.get("status") or {}).get("phase") == RestorePhase.IN_PROGRESS.value
        ]
        if busy:
            return f"VMRestore {', '.join(sorted(busy))} of the VM is in progress"
        return None

    async def _act_snapshot(
        self,
        key: Key,
        guest: Guest | None,
        view: SnapshotView,
        action: SnapshotAction,
        vm: VmRef | None,
    ) -> None:
        match action:
            case Adopt():
                await self._adopt("VMSnapshot", key, action)
            case TakeSnapshot(name=name, memory=memory, quiesce=quiesce):
                if guest is None:
                    return
                try:
                    started = time.monotonic()
                    plan = snapshots.disk_plan(await guest.xml())
                    await snapshots.create_snapshot(
                        guest,
                        name,
                        include_memory=memory,
                        quiesce=quiesce,
                        disks=plan,
                        description=json.dumps(
                            {"vmsnapshot": f"{view.namespace}/{view.name}", "uid": view.uid}
                        ),
                    )
                    self.log.info(
                        "snapshot taken",
                        namespace=view.namespace,
                        vmsnapshot=view.name,
                        seconds=round(time.monotonic() - started, 3),
                    )
                except hv_errors.AlreadyExists:
                    return  # taken by a run that died before it could say so: done
                except hv_errors.HypervisorError as exc:
                    raise _hv_error(exc) from exc
            case RedefineSnapshot():
                await self._redefine(guest, action, key[0], vm)
            case DeleteSnapshot(name=name):
                if guest is None:
                    return
                try:
                    await snapshots.delete(guest, name)
                except hv_errors.NotFound:
                    return
                except hv_errors.HypervisorError as exc:
                    raise ActError(type(exc).__name__, str(exc), permanent=False) from exc

    async def _redefine(
        self, guest: Guest | None, action: RedefineSnapshot, namespace: str, vm: VmRef | None
    ) -> None:
        if guest is None:
            return
        if vm is None:
            raise ActError("VMNotFound", "the VirtualMachine is gone", permanent=False)
        try:
            await redefine_checked(self.agent, guest, action, namespace, vm.name, vm.uid)
        except UnsafeSnapshotError as exc:
            raise ActError(
                UNSAFE_SNAPSHOT_XML,
                f"status.snapshotXML of {action.name} is not a snapshot virtfleet took of "
                f"VirtualMachine {vm.name}; it was not redefined: {exc}",
                permanent=True,
            ) from exc
        except hv_errors.AlreadyExists:
            return
        except hv_errors.HypervisorError as exc:
            raise _hv_error(exc) from exc

    # --- VMRestore ------------------------------------------------------------------

    async def reconcile_restores(self, vm_key: Key) -> float | None:
        """Every unfinished restore of one VM; at most one of them acts."""
        async with self.locks.lock(vm_key):
            return await self._reconcile_restores(vm_key)

    async def _reconcile_restores(self, vm_key: Key) -> float | None:
        namespace, vm_name = vm_key
        requeue: float | None = None
        listed: dict[str, list[str]] = {}
        for _ in range(MAX_PASSES):
            vm_body = self._vm_body(namespace, vm_name)
            if vm_body is None:
                return None
            vm = self._vm_ref(vm_body)
            bodies = {
                key: body
                for key, body in self.restores.items()
                if key[0] == namespace and (body.get("spec") or {}).get("vmName") == vm_name
            }
            views = {key: self._restore_view(body, vm.uid) for key, body in bodies.items()}
            open_ = [
                v
                for v in views.values()
                if v.status.phase not in (RestorePhase.SUCCEEDED, RestorePhase.FAILED)
            ]
            if not open_:
                return requeue
            # The one in progress holds the VM; otherwise the oldest that is not refused.
            held = active_restore(open_)
            holder = held.name if held and held.status.phase is RestorePhase.IN_PROGRESS else None
            again = False
            for view in restore_order(open_):
                key = (namespace, view.name)
                result = await self._restore_one(key, bodies[key], view, vm, holder, listed)
                if result == 0.0:
                    again = True
                elif result is not None:
                    requeue = result if requeue is None else min(requeue, result)
                phase = (self.restores.get(key, {}).get("status") or {}).get("phase")
                if holder is None and phase not in (
                    RestorePhase.SUCCEEDED.value,
                    RestorePhase.FAILED.value,
                ):
                    holder = view.name
            if not again:
                return requeue
        return 0.5

    async def _restore_one(
        self,
        key: Key,
        body: Mapping[str, Any],
        view: RestoreView,
        vm: VmRef,
        chosen: str | None,
        listed: dict[str, list[str]],
    ) -> float | None:
        """One decide-act pass for one restore: 0.0 means "look again right away".

        ``listed``: the VM's active migrations as read (fresh) earlier in the same
        reconcile, milliseconds ago, under the VM's lock.
        """
        log = self.log.bind(namespace=key[0], vmrestore=key[1], vm=vm.name)
        snapshot = self._snapshot_ref(key[0], view.spec.snapshot_name) if view.spec else None
        busy_with = chosen if chosen is not None and chosen != view.name else None
        migrations: list[str] = []
        if busy_with is None and view.status.phase in (None, RestorePhase.PENDING):
            try:
                if vm.name not in listed:
                    listed[vm.name] = await self._active_migrations(key[0], vm.name)
                migrations = listed[vm.name]
            except KubeError as exc:
                log.warning("could not list migrations", error=str(exc))
                return 5.0
        name = view.status.snapshot_name or (snapshot.libvirt_name if snapshot else None)
        dom, guest = await self.observe(view.status.vm_uid or vm.uid, name)
        now = datetime.now(UTC)
        decision = decide_restore(
            view,
            vm=vm,
            snapshot=snapshot,
            dom=dom,
            node=self.node,
            now=now,
            busy_with=busy_with,
            migrations=migrations,
        )
        await self._events(body, decision.events)
        # The commitment: stored (compare-and-swap) before the revert, or nothing happens.
        if decision.write_status_first and not await self._write_status(
            "VMRestore", key, body, decision.status, cas=True
        ):
            return 0.5
        if decision.actions:
            log.info("acting", actions=[type(a).__name__ for a in decision.actions])
        try:
            await self._act_restore_all(key, guest, decision.actions, vm)
        except ActError as exc:
            log.warning("restore action failed", reason=exc.reason, error=exc.message)
            if not exc.permanent:
                return 5.0  # the marker tells the next pass whether the revert happened
            failed = restore_action_failed(view, decision.status, exc.reason, exc.message, now)
            await self._events(body, (EventNote("Warning", exc.reason, exc.message),))
            await self._write_status("VMRestore", key, body, failed)
            return None
        if not decision.write_status_first and not decision.transient:
            await self._write_status("VMRestore", key, body, decision.status)
        if decision.actions or decision.write_status_first:
            return 0.0
        return decision.requeue_after

    async def _active_migrations(self, namespace: str, vm_name: str) -> list[str]:
        """VMMigrations of the VM that are not over, read fresh (not from a cache)."""
        items = await self.kube.list("VMMigration", namespace)
        return [
            str(m["metadata"]["name"])
            for m in items
            if (m.get("spec") or {}).get("vmName") == vm_name
            and (m.get("status") or {}).get("phase") not in MIGRATION_DONE_PHASES
        ]

    async def _act_restore_all(
        self, key: Key, guest: Guest | None, actions: Sequence[RestoreAction], vm: VmRef
    ) -> None:
        """In order, except that the adoption (API) and the marker (libvirt) go together.

        Both are idempotent and independent: a marker set without the adoption is found
        set on the next pass; an adoption without the marker marks again.
        """
        index = 0
        if (
            len(actions) >= 2
            and isinstance(actions[0], Adopt)
            and isinstance(actions[1], MarkDomain)
        ):
            results = await asyncio.gather(
                self._act_restore(key, guest, actions[0], vm),
                self._act_restore(key, guest, actions[1], vm),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            index = 2
        for action in actions[index:]:
            await self._act_restore(key, guest, action, vm)

    async def _act_restore(
        self, key: Key, guest: Guest | None, action: RestoreAction, vm: VmRef
    ) -> None:
        if isinstance(action, Adopt):
            await self._adopt("VMRestore", key, action)
            return
        if guest is None:
            raise ActError("DomainGone", "the VM's domain is not defined", permanent=False)
        try:
            match action:
                case RedefineSnapshot():
                    await self._redefine(guest, action, key[0], vm)
                case MarkDomain(token=token):
                    await snapshots.set_restore_marker(guest, token)
                case Revert(name=name, running=running):
                    await snapshots.revert(guest, name, running=running)
                case DestroyDomain():
                    if (await guest.status()).state.active:
                        await guest.destroy()
                case StartDomain():
                    if not (await guest.status()).state.active:
                        await guest.start()
        except hv_errors.HypervisorError as exc:
            raise _hv_error(exc) from exc

    # --- writing --------------------------------------------------------------------

    async def _adopt(self, kind: str, key: Key, action: Adopt) -> None:
        """ownerReference to the VM, node label, and (snapshots) the node's finalizer.

        Metadata only, with the resourceVersion read, so a concurrent change is never
        overwritten (merge patches replace lists whole).
        """
        cache = self.snapshots if kind == "VMSnapshot" else self.restores
        body = cache.get(key)
        if body is None:
            return
        meta = body["metadata"]
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != action.vm_uid]
        refs.append(
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "VirtualMachine",
                "name": action.vm_name,
                "uid": action.vm_uid,
                "blockOwnerDeletion": False,
            }
        )
        metadata: dict[str, Any] = {
            "ownerReferences": refs,
            "labels": {NODE_LABEL: self.node},
            "resourceVersion": meta.get("resourceVersion"),
        }
        if action.finalizer:
            finalizers = list(meta.get("finalizers") or [])
            if self.settings.finalizer not in finalizers:
                finalizers.append(self.settings.finalizer)
            metadata["finalizers"] = finalizers
        try:
            updated = await self.kube.patch(kind, key[0], key[1], {"metadata": metadata})
        except (Conflict, NotFound) as exc:
            raise ActError("Conflict", str(exc), permanent=False) from exc
        cache[key] = dict(updated)

    async def _write_status(
        self,
        kind: str,
        key: Key,
        body: Mapping[str, Any],
        status: VMSnapshotStatus | VMRestoreStatus,
        *,
        cas: bool = False,
    ) -> bool:
        """Write status if it changed; False when it could not be stored."""
        cache = self.snapshots if kind == "VMSnapshot" else self.restores
        current = cache.get(key, body)
        patch = status_patch(current.get("status"), status.to_wire())
        if patch is None:
            return True
        version = str(current["metadata"].get("resourceVersion")) if cas else None
        try:
            updated = await self.kube.patch_status(
                kind, key[0], key[1], patch, resource_version=version
            )
        except Conflict:
            with contextlib.suppress(KubeError):
                cache[key] = dict(await self.kube.get(kind, key[0], key[1]))
            return False
        except NotFound:
            return False
        if key in cache:
            cache[key] = dict(updated)
        return True

    async def _events(self, body: Mapping[str, Any], events: Iterable[EventNote]) -> None:
        for note in events:
            with contextlib.suppress(Exception):  # an Event is best effort
                await self.kube.record_event(body, note.type, note.reason, note.message, COMPONENT)


# --- kopf wiring (called from virtfleet.agent.handlers.build_registry) ---------------------

#: How long one run of the VMSnapshot deletion handler waits before kopf retries it.
DELETE_WAIT_SECONDS = 20.0


def register(
    registry: kopf.OperatorRegistry,
    settings: AgentSettings,
    get: Callable[[], SnapshotAgent],
) -> None:
    """kopf handlers for VMSnapshots and VMRestores: feed the caches, hold finalizers.

    Events of every VMSnapshot/VMRestore are watched (which node cares depends on where
    the VM is, not on a label of the snapshot); the deletion handler only matches
    snapshots labelled for this node, so kopf keeps this node's finalizer on exactly
    those (the agent adds label and finalizer together when it adopts a snapshot).
    """
    on_node = {NODE_LABEL: settings.node_name}

    @kopf.on.event(API_GROUP, API_VERSION, "vmsnapshots", registry=registry)  # type: ignore[arg-type]
    def vmsnapshot_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_snapshot_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.event(API_GROUP, API_VERSION, "vmrestores", registry=registry)  # type: ignore[arg-type]
    def vmrestore_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_restore_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.delete(API_GROUP, API_VERSION, "vmsnapshots", labels=on_node, registry=registry)
    async def vmsnapshot_delete(body: Any, **_: Any) -> None:
        if not await get().wait_snapshot_finalized(key_of(body), DELETE_WAIT_SECONDS):
            raise kopf.TemporaryError("deleting the libvirt snapshot", delay=1)


def start(agent: Agent, locks: VmLocks) -> tuple[SnapshotAgent, list[asyncio.Task[None]]]:
    """The snapshot loops of a started agent: queues and a periodic resync."""
    snaps = SnapshotAgent(agent, locks)
    agent.hv.on_reconnect(snaps.on_reconnect)
    agent.on_forget(snaps.forget_vm)
    tasks = [
        asyncio.create_task(
            snaps.snapshot_queue.run(snaps.reconcile_snapshot), name="vmsnapshot-queue"
        ),
        asyncio.create_task(
            snaps.restore_queue.run(snaps.reconcile_restores), name="vmrestore-queue"
        ),
        asyncio.create_task(_resync(snaps), name="snapshot-resync"),
    ]
    return snaps, tasks


async def stop(snaps: SnapshotAgent) -> None:
    await snaps.snapshot_queue.stop()
    await snaps.restore_queue.stop()


async def _resync(snaps: SnapshotAgent) -> None:
    """Every ``resync_seconds``: lost libvirt metadata, deadlines, missed events."""
    while True:
        await asyncio.sleep(snaps.settings.resync_seconds)
        snaps.resync()
