"""The VMRestore loop: every unfinished restore of one VM, judged together, one acting.

The decisions are :func:`virtfleet.reconcile.restore.decide_restore` (whose module doc
says how a revert happens at most once); this runs them under the VM's lock, taken by
:meth:`SnapshotAgent.reconcile_restores
<virtfleet.agent.snapshot.agent.SnapshotAgent.reconcile_restores>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
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
from virtfleet.agent.snapshot.views import restore_view, snapshot_ref, vm_ref
from virtfleet.api.snapshot import RestorePhase
from virtfleet.hypervisor import Guest, snapshots
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.reconcile.restore import (
    DestroyDomain,
    MarkDomain,
    RestoreAction,
    Revert,
    StartDomain,
    active_restore,
    decide_restore,
    restore_action_failed,
    restore_order,
)
from virtfleet.reconcile.snapshot_migration import MIGRATION_DONE_PHASES
from virtfleet.reconcile.snapshot_types import (
    Adopt,
    RedefineSnapshot,
    RestoreView,
    SnapshotRef,
    VmRef,
)
from virtfleet.reconcile.vm_model import EventNote
from virtfleet.runtime.kube import KubeError

if TYPE_CHECKING:
    from virtfleet.agent.snapshot.agent import SnapshotAgent


class RestoreLoop:
    """Reconciles the restores of one VM at a time from the state ``snaps`` keeps."""

    def __init__(self, snaps: SnapshotAgent) -> None:
        self.snaps = snaps
        self.store = snaps.restore_store

    async def reconcile(self, vm_key: Key) -> float | None:
        """Every unfinished restore of one VM; the caller holds the VM's lock."""
        snaps = self.snaps
        namespace, vm_name = vm_key
        requeue: float | None = None
        listed: dict[str, list[str]] = {}
        for _ in range(MAX_PASSES):
            vm_body = snaps.vm_body(namespace, vm_name)
            if vm_body is None:
                return None
            vm = vm_ref(vm_body)
            bodies = {
                key: body
                for key, body in snaps.restores.items()
                if key[0] == namespace and (body.get("spec") or {}).get("vmName") == vm_name
            }
            views = {key: restore_view(body, vm.uid) for key, body in bodies.items()}
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
                phase = (snaps.restores.get(key, {}).get("status") or {}).get("phase")
                if holder is None and phase not in (
                    RestorePhase.SUCCEEDED.value,
                    RestorePhase.FAILED.value,
                ):
                    holder = view.name
            if not again:
                return requeue
        return CONFLICT_RETRY_SECONDS

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
        snaps = self.snaps
        log = snaps.log.bind(namespace=key[0], vmrestore=key[1], vm=vm.name)
        snapshot = (
            self._snapshot_ref(key[0], view.spec.snapshot_name)
            if view.spec and view.spec.snapshot_name
            else None
        )
        busy_with = chosen if chosen is not None and chosen != view.name else None
        migrations: list[str] = []
        if busy_with is None and view.status.phase in (None, RestorePhase.PENDING):
            try:
                if vm.name not in listed:
                    listed[vm.name] = await self._active_migrations(key[0], vm.name)
                migrations = listed[vm.name]
            except KubeError as exc:
                log.warning("could not list migrations", error=str(exc))
                return ACTION_RETRY_SECONDS
        name = view.status.snapshot_name or (snapshot.libvirt_name if snapshot else None)
        dom, guest = await snaps.observe(view.status.vm_uid or vm.uid, name)
        now = datetime.now(UTC)
        decision = decide_restore(
            view,
            vm=vm,
            snapshot=snapshot,
            dom=dom,
            node=snaps.node,
            now=now,
            busy_with=busy_with,
            migrations=migrations,
        )
        await self.store.record_events(body, decision.events)
        # The commitment: stored (compare-and-swap) before the revert, or nothing happens.
        if decision.write_status_first and not await self.store.write_status(
            key, body, decision.status, cas=True
        ):
            return CONFLICT_RETRY_SECONDS
        if decision.actions:
            log.info("acting", actions=[type(a).__name__ for a in decision.actions])
        try:
            await self._act_all(key, guest, decision.actions, vm)
        except ActionError as exc:
            log.warning("restore action failed", reason=exc.reason, error=exc.message)
            if not exc.permanent:
                return ACTION_RETRY_SECONDS  # the marker tells the next pass whether it happened
            failed = restore_action_failed(view, decision.status, exc.reason, exc.message, now)
            await self.store.record_events(body, (EventNote("Warning", exc.reason, exc.message),))
            await self.store.write_status(key, body, failed)
            return None
        if not decision.write_status_first and not decision.transient:
            await self.store.write_status(key, body, decision.status)
        if decision.actions or decision.write_status_first:
            return 0.0
        return decision.requeue_after

    def _snapshot_ref(self, namespace: str, name: str) -> SnapshotRef | None:
        body = self.snaps.snapshots.get((namespace, name))
        return None if body is None else snapshot_ref(body, name)

    async def _active_migrations(self, namespace: str, vm_name: str) -> list[str]:
        """VMMigrations of the VM that are not over, read fresh (not from a cache)."""
        items = await self.snaps.kube.list("VMMigration", namespace)
        return [
            str(m["metadata"]["name"])
            for m in items
            if (m.get("spec") or {}).get("vmName") == vm_name
            and (m.get("status") or {}).get("phase") not in MIGRATION_DONE_PHASES
        ]

    async def _act_all(
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
                self._act(key, guest, actions[0], vm),
                self._act(key, guest, actions[1], vm),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            index = 2
        for action in actions[index:]:
            await self._act(key, guest, action, vm)

    async def _act(self, key: Key, guest: Guest | None, action: RestoreAction, vm: VmRef) -> None:
        if isinstance(action, Adopt):
            await self.store.adopt(key, action)
            return
        if guest is None:
            raise ActionError("DomainGone", "the VM's domain is not defined", permanent=False)
        try:
            match action:
                case RedefineSnapshot():
                    await redefine_for_vm(self.snaps.agent, guest, action, key[0], vm)
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
            raise hypervisor_failure(exc) from exc
