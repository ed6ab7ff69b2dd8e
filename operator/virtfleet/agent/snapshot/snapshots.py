"""The VMSnapshot loop: observe the VM's domain, decide, act, until nothing is left.

The decisions are :func:`virtfleet.reconcile.snapshot.decide_snapshot`; this runs them
under the VM's lock (taken by :meth:`SnapshotAgent.reconcile_snapshot
<virtfleet.agent.snapshot.agent.SnapshotAgent.reconcile_snapshot>`).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from virtfleet.agent.errors import ActionError
from virtfleet.agent.snapshot.domain import (
    ACTION_RETRY_SECONDS,
    CONFLICT_RETRY_SECONDS,
    MAX_PASSES,
    hypervisor_failure,
)
from virtfleet.agent.snapshot.redefine import redefine_for_vm
from virtfleet.agent.snapshot.views import snapshot_view, vm_ref
from virtfleet.api.snapshot import RestorePhase, SnapshotPhase, VMSnapshotStatus
from virtfleet.hypervisor import Guest, guestagent, snapshots
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.reconcile.quiesce import QuiesceOutcome, describe
from virtfleet.reconcile.snapshot import (
    DeleteSnapshot,
    SnapshotAction,
    TakeSnapshot,
    ThawFilesystems,
    decide_snapshot,
    snapshot_action_failed,
)
from virtfleet.reconcile.snapshot_types import (
    Adopt,
    RedefineSnapshot,
    SnapshotView,
    VmRef,
    libvirt_snapshot_name,
)
from virtfleet.reconcile.vm_model import EventNote

if TYPE_CHECKING:
    from virtfleet.agent.snapshot.agent import SnapshotAgent


class SnapshotLoop:
    """Reconciles one VMSnapshot at a time from the state ``snaps`` keeps."""

    def __init__(self, snaps: SnapshotAgent) -> None:
        self.snaps = snaps
        self.store = snaps.snapshot_store

    async def reconcile(self, key: Key) -> float | None:
        """Passes until the snapshot needs nothing now; the caller holds the VM's lock."""
        snaps = self.snaps
        log = snaps.log.bind(namespace=key[0], vmsnapshot=key[1])
        requeue: float | None = None
        for _ in range(MAX_PASSES):
            body = snaps.snapshots.get(key)
            if body is None:
                return None
            deleting = bool(body["metadata"].get("deletionTimestamp"))
            vm_body = snaps.vm_body(key[0], str((body.get("spec") or {}).get("vmName", "")))
            if vm_body is None and not deleting:
                return None  # not (or no longer) this node's business
            vm = vm_ref(vm_body) if vm_body is not None else None
            status = VMSnapshotStatus.model_validate(body.get("status") or {})
            vm_uid = status.vm_uid or (vm.uid if vm else None)
            view = snapshot_view(
                body, vm.uid if vm else None, node=snaps.node, finalizer=snaps.settings.finalizer
            )
            name = status.snapshot_name or libvirt_snapshot_name(view.uid)
            dom, guest = await snaps.observe(
                vm_uid,
                name,
                want_xml=status.phase is not SnapshotPhase.READY,
                vm_body=vm_body,
            )
            blocked = self._blocked(key[0], vm) if vm else None
            now = datetime.now(UTC)
            decision = decide_snapshot(view, vm, dom, snaps.node, now, blocked_by=blocked)
            if decision.write_status_first and not await self.store.write_status(
                key, body, decision.status, cas=True
            ):
                return CONFLICT_RETRY_SECONDS  # someone else wrote meanwhile: decide again
            if decision.actions:
                log.info("acting", actions=[type(a).__name__ for a in decision.actions])
            try:
                for action in decision.actions:
                    await self._act(key, guest, view, action, vm)
            except ActionError as exc:
                log.warning("snapshot action failed", reason=exc.reason, error=exc.message)
                if not exc.permanent:
                    return ACTION_RETRY_SECONDS
                failed = snapshot_action_failed(view, decision.status, exc.reason, exc.message, now)
                await self.store.record_events(
                    body, (EventNote("Warning", exc.reason, exc.message),)
                )
                await self.store.write_status(key, body, failed)
                return None
            # After the actions: an Event such as SnapshotRedefined says what was done.
            await self.store.record_events(body, decision.events)
            if decision.finalized:
                if key in snaps.snapshots:  # not when its DELETED event came meanwhile
                    snaps.finalized.setdefault(key, asyncio.Event()).set()
                return None
            if not decision.write_status_first and not decision.transient:
                await self.store.write_status(key, body, decision.status)
            requeue = decision.requeue_after
            if not decision.actions and not decision.write_status_first:
                break
            if requeue:
                break
        return requeue

    def _blocked(self, namespace: str, vm: VmRef) -> str | None:
        """Why the VM cannot be snapshotted now: one of its restores is in progress."""
        busy = [
            key[1]
            for key, body in self.snaps.restores.items()
            if key[0] == namespace
            and (body.get("spec") or {}).get("vmName") == vm.name
            and (body.get("status") or {}).get("phase") == RestorePhase.IN_PROGRESS.value
        ]
        if busy:
            return f"VMRestore {', '.join(sorted(busy))} of the VM is in progress"
        return self.snaps.agent.held((namespace, vm.name))

    async def _act(
        self,
        key: Key,
        guest: Guest | None,
        view: SnapshotView,
        action: SnapshotAction,
        vm: VmRef | None,
    ) -> None:
        match action:
            case Adopt():
                await self.store.adopt(key, action)
            case TakeSnapshot(name=name, memory=memory, quiesce=quiesce):
                if guest is None:
                    return
                await self._take(guest, view, name, memory=memory, quiesce=quiesce)
            case RedefineSnapshot():
                await redefine_for_vm(self.snaps.agent, guest, action, key[0], vm)
            case ThawFilesystems():
                if guest is not None:
                    await self._thaw(guest, view)
            case DeleteSnapshot(name=name):
                if guest is None:
                    return
                try:
                    await snapshots.delete(guest, name)
                except hv_errors.NotFound:
                    return
                except hv_errors.HypervisorError as exc:
                    raise ActionError(type(exc).__name__, str(exc), permanent=False) from exc

    async def _take(
        self, guest: Guest, view: SnapshotView, name: str, *, memory: bool, quiesce: bool
    ) -> None:
        log = self.snaps.log.bind(namespace=view.namespace, vmsnapshot=view.name)
        outcome: QuiesceOutcome | None = None
        error: str | None = None
        try:
            started = time.monotonic()
            plan = snapshots.disk_plan(await guest.xml())
            try:
                if quiesce:
                    outcome, error = await self._freeze(guest, log)
                await snapshots.create_snapshot(
                    guest,
                    name,
                    include_memory=memory,
                    disks=plan,
                    description=describe(view.namespace, view.name, view.uid, outcome, error),
                )
            finally:
                # Also when cancelled during the freeze (outcome unknown): a thaw of a
                # guest that is not frozen is harmless.
                if quiesce and (outcome is None or outcome.froze):
                    await self._thaw(guest, view)
            seconds = time.monotonic() - started
            log.info(
                "snapshot taken",
                quiesce=outcome.value if outcome else None,
                seconds=round(seconds, 3),
            )
            self._count("succeeded", seconds)
        except hv_errors.AlreadyExists:
            return  # taken by a run that died before it could say so: done
        except hv_errors.HypervisorError as exc:
            self._count("failed", time.monotonic() - started)
            raise hypervisor_failure(exc) from exc

    def _count(self, outcome: str, seconds: float) -> None:
        if self.snaps.agent.metrics is not None:
            self.snaps.agent.metrics.snapshot_taken(outcome, seconds)

    @staticmethod
    async def _freeze(guest: Guest, log: Any) -> tuple[QuiesceOutcome, str | None]:
        result = await guestagent.freeze_filesystems(guest)
        if not result.attempted:
            return QuiesceOutcome.NO_GUEST_AGENT, None
        if result.error is not None:
            log.warning("guest filesystems not frozen", error=result.error)
            return QuiesceOutcome.QUIESCE_FAILED, result.error
        log.info("guest filesystems frozen", filesystems=result.frozen)
        return QuiesceOutcome.QUIESCED, None

    async def _thaw(self, guest: Guest, view: SnapshotView) -> None:
        """Best effort, logged: the first Ready pass thaws again, and the guest-agent
        poller thaws a guest still frozen minutes later (:mod:`virtfleet.agent.guestagent`)."""
        log = self.snaps.log.bind(namespace=view.namespace, vmsnapshot=view.name)
        try:
            thawed = await guestagent.thaw_filesystems(guest)
        except hv_errors.HypervisorError as exc:
            log.warning("guest filesystems not thawed", error=str(exc))
            return
        log.info("guest filesystems thawed", filesystems=thawed)
