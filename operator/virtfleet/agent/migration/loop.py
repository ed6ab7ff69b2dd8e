"""The source node's migration loop: watch VMMigrations, start, cancel, guard the VM loop.

The agent of the VM's node (``status.sourceNode``) acts on a ``Scheduled`` migration:
refusal checks (:mod:`.checks`), adoption (node label and this agent's finalizer, so
deleting the object cancels the job) and ``Running`` stored with a compare-and-swap —
the commitment: a second agent, or this one after a restart, never starts it again.
Then the live (:mod:`.live`) or offline (:mod:`.offline`) job runs under the VM's lock,
so the VM loop never "heals" a domain in the middle of leaving. A restart that finds
``Running`` and no job of its own recovers (:mod:`.recovery`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from virtfleet.agent.agent import COMPONENT, Agent, key_of
from virtfleet.agent.errors import ActionError
from virtfleet.agent.migration import checks
from virtfleet.agent.migration.context import MigrationContext, now
from virtfleet.agent.migration.jobs import RunningJob
from virtfleet.agent.migration.live import run_live
from virtfleet.agent.migration.offline import run_offline
from virtfleet.agent.migration.recovery import recover
from virtfleet.api.migration import (
    MigrationMode,
    MigrationPhase,
    VMMigrationSpec,
    VMMigrationStatus,
)
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineSpec
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor import migration as hv_migration
from virtfleet.identity import NODE_LABEL, Key
from virtfleet.reconcile.migration import running_status
from virtfleet.reconcile.migration_job import EndReason, Fail, is_postcopy_failure
from virtfleet.runtime.failures import cache_reporter
from virtfleet.runtime.kube import Conflict, KubeError, NotFound
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.versions import store_newest

if TYPE_CHECKING:
    from virtfleet.agent.locks import VmLocks
    from virtfleet.agent.snapshot.agent import SnapshotAgent

#: A migration looks again this soon when the VM cache is behind the API (at start-up).
CACHE_BEHIND_RETRY_SECONDS = 1.0
#: The VM loop looks again this soon while an interrupted migration is being recovered.
RECOVERY_WAIT_SECONDS = 2.0
#: A start that lost a write race (adoption or the Running compare-and-swap) retries.
START_RETRY_SECONDS = 1.0
#: Concurrent jobs per node (each is mostly waiting on libvirt).
WORKERS = 4
#: How long a migration waits for its target to realise the VM's VMNetworks, and how
#: often it looks (the target's agent reports them in its VMHost within a pass).
TARGET_NETWORK_WAIT_SECONDS = 60.0
TARGET_NETWORK_POLL_SECONDS = 0.5


class MigrationAgent:
    """VMMigrations leaving this node (see the module doc)."""

    def __init__(self, agent: Agent, locks: VmLocks, snaps: SnapshotAgent) -> None:
        self.agent = agent
        self.locks = locks
        self.snaps = snaps
        self.ctx = MigrationContext(agent)
        self.settings = agent.settings
        self.node = agent.settings.node_name
        self.cache = self.ctx.cache
        self.log = self.ctx.log
        self.queue: WorkQueue[Key] = WorkQueue(
            name="vmmigrations",
            workers=WORKERS,
            on_error=cache_reporter(agent.kube, "VMMigration", COMPONENT, self.cache, cas=True),
        )
        self.ctx.requeue = self.queue.add
        #: Jobs running in this process, one entry each (see :class:`RunningJob`).
        self.jobs: dict[Key, RunningJob] = {}
        #: Since when a migration waits for its target's VMNetworks (monotonic seconds).
        self.network_waits: dict[Key, float] = {}

    # --- signals ----------------------------------------------------------------------

    def on_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self.agent.networks.on_migration_event(event_type, body)  # a target's networks
        key = key_of(body)
        if event_type == "DELETED":
            gone = self.cache.pop(key, None) or body
            self.queue.forget(key)
            self.network_waits.pop(key, None)
            vm_name = (gone.get("spec") or {}).get("vmName")
            if is_postcopy_failure((gone.get("status") or {}).get("failureReason")) and vm_name:
                self.agent.queue.add((key[0], str(vm_name)))  # the VM loop may act again
            return
        if not store_newest(self.cache, key, body):
            return
        if (body.get("status") or {}).get("sourceNode") == self.node:
            self.queue.add(key)

    def resync(self) -> None:
        for key, body in self.cache.items():
            if (body.get("status") or {}).get("sourceNode") == self.node:
                self.queue.add(key)

    def bookkeeping(self) -> dict[str, int]:
        """Entries per structure kept per migration (what must return to 0 with them)."""
        return {
            "migrations": len(self.cache),
            "migration_queue": self.queue.tracked,
            "migration_jobs": len(self.jobs),
            "migration_waits": sum(1 for job in self.jobs.values() if job.waited),
            "migration_network_waits": len(self.network_waits),
        }

    async def cancel(self, key: Key, timeout: float) -> bool:
        """For the kopf deletion handler: abort a running job; True once nothing runs."""
        job = self.jobs.get(key)
        if job is None:
            self.queue.add(key)
            phase = (self.cache.get(key, {}).get("status") or {}).get("phase")
            return phase not in (MigrationPhase.SCHEDULED.value, MigrationPhase.RUNNING.value)
        job.state.cancelled = True
        job.waited = True
        self.log.info("cancelling migration", namespace=key[0], vmmigration=key[1])
        try:
            await hv_migration.abort(job.guest)
        except hv_errors.HypervisorError as exc:
            self.log.info("abort not accepted (the job may be ending)", error=str(exc))
        try:
            await asyncio.wait_for(job.ended.wait(), timeout)
        except TimeoutError:
            self.log.info("the job did not end yet; the deletion handler retries")
        return job.ended.is_set()

    # --- the VM loop's guard ----------------------------------------------------------

    def _of_vm(self, vm_key: Key, phase: MigrationPhase) -> list[tuple[Key, dict[str, Any]]]:
        """Migrations of the VM out of this node in ``phase``."""
        return [
            (key, body)
            for key, body in self.cache.items()
            if key[0] == vm_key[0]
            and (body.get("spec") or {}).get("vmName") == vm_key[1]
            and (body.get("status") or {}).get("sourceNode") == self.node
            and (body.get("status") or {}).get("phase") == phase.value
        ]

    def _unrecovered(self, vm_key: Key) -> list[Key]:
        """Migrations of the VM out of this node that run with no job in this process."""
        return [k for k, _ in self._of_vm(vm_key, MigrationPhase.RUNNING) if k not in self.jobs]

    def _postcopy_lost(self, vm_key: Key) -> bool:
        """A migration of the VM out of this node failed after the switch to post-copy."""
        return any(
            is_postcopy_failure((body.get("status") or {}).get("failureReason"))
            for _, body in self._of_vm(vm_key, MigrationPhase.FAILED)
        )

    def guard(
        self, handler: Callable[[Key], Awaitable[float | None]]
    ) -> Callable[[Key], Awaitable[float | None]]:
        """The VM loop waits while a migration of the VM is ``Running`` but not (yet) ours.

        After a restart mid-migration, libvirtd may still run the job (or have finished
        it and undefined the domain here): "healing" the VM then would start a second
        copy of it. The recovery decides first; the VM loop goes on afterwards.
        """

        async def run(key: Key) -> float | None:
            body = self.agent.cache.get(key)
            migrating = (body or {}).get("status", {}).get(
                "printableStatus"
            ) == PrintableStatus.MIGRATING.value
            if self._postcopy_lost(key):
                return None  # the guest is lost: nobody touches it until the VMMigration goes
            pending = self._unrecovered(key)
            if not pending and migrating:
                pending = await self._list_unrecovered(key)
            if pending:
                for mig in pending:
                    self.queue.add(mig)
                return RECOVERY_WAIT_SECONDS
            return await handler(key)

        return run

    async def _list_unrecovered(self, vm_key: Key) -> list[Key]:
        """At start-up the VM watch may be ahead of the VMMigration watch: ask the API."""
        try:
            items = await self.ctx.kube.list("VMMigration", vm_key[0])
        except KubeError as exc:
            self.log.info("cannot list VMMigrations for the guard", error=str(exc))
            return []
        for item in items:
            key = key_of(item)
            store_newest(self.cache, key, item)
        return self._unrecovered(vm_key)

    # --- the reconcile ----------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        body = self.cache.get(key)
        if body is None or key in self.jobs:
            return None
        status = VMMigrationStatus.model_validate(body.get("status") or {})
        if status.source_node != self.node:
            return None
        try:
            spec = VMMigrationSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return None  # the controller refuses it
        deleting = bool(body["metadata"].get("deletionTimestamp"))
        log = self.log.bind(namespace=key[0], vmmigration=key[1], vm=spec.vm_name)
        vm_key = (key[0], spec.vm_name)
        if status.phase is MigrationPhase.SCHEDULED:
            if deleting:
                cancelled = Fail(
                    EndReason.CANCELLED,
                    "deleted before it started",
                    phase=MigrationPhase.CANCELLED,
                    release_vm=False,
                )
                await self.ctx.fail(key, vm_key, cancelled)
                return None
            return await self._start(key, spec, status, log)
        if status.phase is MigrationPhase.RUNNING:
            return await recover(self.ctx, self.locks, key, spec, status, log)
        return None

    async def _start(
        self, key: Key, spec: VMMigrationSpec, status: VMMigrationStatus, log: Any
    ) -> float | None:
        vm_key = (key[0], spec.vm_name)
        async with self.locks.lock(vm_key):
            cached_vm = self.agent.cache.get(vm_key)
            if not self.ctx.mine(cached_vm) and await self._cache_behind(vm_key):
                return CACHE_BEHIND_RETRY_SECONDS
            try:
                vm_body, guest, vm_spec = await checks.check_vm(self.ctx, spec, cached_vm)
                held = self.agent.held(vm_key)
                if held:
                    raise ActionError(
                        "RestoreInProgress", f"the VM cannot move: {held}", permanent=True
                    )
                checks.check_snapshots(
                    self.ctx,
                    self.snaps.snapshots,
                    self.snaps.restores,
                    key[0],
                    spec.vm_name,
                    vm_spec,
                )
                dest_uri = await checks.target_uri(self.ctx, status.target_node or "")
                waiting = await self._target_networks(key, status.target_node or "", vm_spec, log)
                if waiting is not None:
                    return waiting
            except ActionError as exc:
                log.warning("migration refused", reason=exc.reason, error=exc.message)
                await self.ctx.fail(key, vm_key, Fail(exc.reason, exc.message, release_vm=False))
                return None
            if not await self._adopt(key):
                return START_RETRY_SECONDS
            wanted = running_status(status, self.ctx.generation_of(key), now())
            if not await self.ctx.write_status(key, wanted, cas=True):
                return START_RETRY_SECONDS  # changed meanwhile (deleted, another writer)
            log.info("migration started", target=status.target_node, uri=dest_uri)
            # The VM says Migrating while the target is prepared (one write less on the
            # job's path); awaited before anything else writes the VM (RunningJob.marked).
            job = RunningJob(guest=guest)
            job.marking = asyncio.create_task(
                self.ctx.vm_printable(vm_key, PrintableStatus.MIGRATING)
            )
            self.jobs[key] = job
            try:
                run = run_offline if spec.mode is MigrationMode.OFFLINE else run_live
                await run(self.ctx, job, key, spec, vm_body, vm_spec, dest_uri, log)
            finally:
                await job.marked()
                self._job_ended(key)
        return None

    async def _target_networks(
        self, key: Key, target: str, vm_spec: VirtualMachineSpec, log: Any
    ) -> float | None:
        """Seconds to wait while the target brings the VM's VMNetworks up (None: they
        are up); refused once that takes longer than TARGET_NETWORK_WAIT_SECONDS."""
        missing = await checks.target_lacks_networks(self.ctx, target, vm_spec)
        if not missing:
            self.network_waits.pop(key, None)
            return None
        since = self.network_waits.setdefault(key, time.monotonic())
        if time.monotonic() - since > TARGET_NETWORK_WAIT_SECONDS:
            self.network_waits.pop(key, None)
            raise checks.refuse(
                "TargetNetworkUnavailable",
                f"node {target} did not bring up VMNetworks {missing} within "
                f"{TARGET_NETWORK_WAIT_SECONDS:.0f}s (its agent needs --tunnel-address; see "
                "its log)",
            )
        log.info("waiting for the target's VMNetworks", target=target, missing=missing)
        return TARGET_NETWORK_POLL_SECONDS

    def _job_ended(self, key: Key) -> None:
        """Nothing of a job outlives it; a cancel() waiting for it wakes up."""
        job = self.jobs.pop(key, None)
        if job is not None:
            job.ended.set()

    async def _cache_behind(self, vm_key: Key) -> bool:
        """Whether the API says the VM is on this node although the cache does not (yet).

        Right after the agent starts, the VMMigration watch may deliver before the VM
        watch filled the cache: refusing then (``VMNotOnSource``) failed valid migrations
        for good (the chaos test saw it 0.1 s after agent restarts). An unanswered read
        counts as "behind" too: refusing is for good, waiting is not.
        """
        try:
            fresh = await self.ctx.kube.get("VirtualMachine", *vm_key)
        except NotFound:
            return False
        except KubeError as exc:
            self.log.info("cannot read the VM to check the cache", error=str(exc))
            return True
        return self.agent.is_mine(fresh)

    async def _adopt(self, key: Key) -> bool:
        """Node label and this agent's finalizer: deleting the object now cancels the job."""
        meta = self.cache[key]["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        labelled = (meta.get("labels") or {}).get(NODE_LABEL) == self.node
        if self.settings.finalizer in finalizers and labelled:
            return True
        if self.settings.finalizer not in finalizers:
            finalizers.append(self.settings.finalizer)
        try:
            updated = await self.ctx.kube.patch(
                "VMMigration",
                *key,
                {
                    "metadata": {
                        "labels": {NODE_LABEL: self.node},
                        "finalizers": finalizers,
                        "resourceVersion": meta.get("resourceVersion"),
                    }
                },
            )
        except (Conflict, NotFound):
            return False
        store_newest(self.cache, key, updated, cached_only=True)
        return True
