"""The source node's part of a VMMigration: prepare the target, migrate, hand the VM over.

The agent of the VM's node (``status.sourceNode``) acts on a ``Scheduled`` migration:

1. checks (VM here and running; snapshots do not block: ``snapshots_block_migration``);
2. adopts the VMMigration (its node label and this agent's finalizer, so deleting the
   object cancels the job) and stores ``Running`` with a compare-and-swap — the
   commitment: a second agent, or this one after a restart, never starts it again;
3. creates the node-local volumes on the *target* over a connection to the target's
   libvirtd (``VMHost.status.migrationURI``). The source does it because it already
   resolved the VM's disks and holds the spec: no hand-shake between two agents, no
   extra phase to recover, and the P2P migration needs that same link anyway;
4. runs ``migrateToURI3`` in the long executor while polling ``jobStats()`` every
   second, publishing ``status.progress`` at most every 1.5 s;
5. hands over: ``status.nodeName`` first (compare-and-swap), then the label and the
   finalizer swap (``agent-<source>`` → ``agent-<target>``) in one metadata write with a
   resourceVersion; then forgets the VM and deletes its node-local volumes here.

The whole job holds the VM's lock (:class:`VmLocks`), so the VM loop never "heals" a
domain in the middle of leaving. A restart that finds ``Running`` and no job of its own
decides by where the domain runs (:func:`job_outcome`): finish the hand-over, or fail
with ``Interrupted`` (the VM still runs here).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import kopf
from lxml import etree
from pydantic import ValidationError

from virtfleet.agent.agent import COMPONENT, Agent, Key, _resource_version, key_of, slim
from virtfleet.agent.driver import seed_volume_name, volume_name
from virtfleet.agent.seed import build_iso, seed_files
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.migration import (
    MigrationMode,
    MigrationPhase,
    MigrationProgress,
    VMMigrationSpec,
    VMMigrationStatus,
)
from virtfleet.api.snapshot import RestorePhase, SnapshotPhase, VMSnapshotStatus
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineSpec
from virtfleet.hypervisor import (
    Guest,
    GuestState,
    GuestStatus,
    Hypervisor,
    HypervisorSettings,
    VolumeRef,
    storage,
)
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor import migration as hv_migration
from virtfleet.identity import API_GROUP, API_VERSION, NODE_LABEL, node_finalizer
from virtfleet.logs import get_logger
from virtfleet.reconcile.migration import (
    DomainWhere,
    completion_budget,
    failed_status,
    handoff_printable,
    job_outcome,
    offline_outcome,
    postcopy_due,
    postcopy_failure_message,
    progress_of,
    running_status,
    should_publish,
    succeeded_status,
    timed_out,
)
from virtfleet.reconcile.snapshot import SnapshotOnNode, snapshots_block_migration
from virtfleet.runtime.failures import cache_reporter
from virtfleet.runtime.kube import Conflict, KubeError, NotFound
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch

if TYPE_CHECKING:
    from virtfleet.agent.locks import VmLocks
    from virtfleet.agent.snapshots import SnapshotAgent

#: jobStats() poll period while the job runs.
POLL_SECONDS = 1.0
#: Pause before re-reading the VM when a hand-over write met a conflict.
CONFLICT_RETRY_SECONDS = 0.01
#: A migration looks again this soon when the VM cache is behind the API (at start-up).
CACHE_BEHIND_RETRY_SECONDS = 1.0
#: The VM loop looks again this soon while an interrupted migration is being recovered.
RECOVERY_WAIT_SECONDS = 2.0
DELETE_WAIT_SECONDS = 20.0
#: ``failureReason`` prefix of a job that failed after the switch to post-copy.
POSTCOPY_FAILED = "PostCopyFailed"


class _CancelledError(Exception):
    """The VMMigration was deleted during an offline job (checked between its steps)."""


class RefusalError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _data_uri(dest_uri: str) -> str | None:
    """``tcp://<host>`` of the target's libvirt URI: QEMU's stream goes to the same host."""
    rest = dest_uri.split("://", 1)[-1]
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return f"tcp://{host}" if host else None


def _disk_targets(xml: str, paths: Mapping[str, str]) -> list[str]:
    """Target devs (``vda``) of the disks whose source file is one of ``paths``' values."""
    root = etree.fromstring(xml.encode())
    wanted = set(paths.values())
    out = []
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        target = disk.find("target")
        if source is not None and target is not None and source.get("file") in wanted:
            out.append(str(target.get("dev")))
    return out


def handoff_finalizers(
    finalizers: list[str], source: str, target: str, *, deleting: bool
) -> list[str]:
    """The VM's finalizers once the source hands it to the target.

    A VM deleted while it migrated cannot take a new finalizer (the apiserver forbids
    adding one during deletion, so the hand-over would fail forever and the deletion
    hang): the source lets go and the VM goes away; the target's orphan sweep removes
    the domain that arrived there.
    """
    kept = [f for f in finalizers if f != source]
    if not deleting and target not in kept:
        kept.append(target)
    return kept


class MigrationAgent:
    """VMMigrations leaving this node (see the module doc)."""

    def __init__(self, agent: Agent, locks: VmLocks, snaps: SnapshotAgent) -> None:
        self.agent = agent
        self.locks = locks
        self.snaps = snaps
        self.kube = agent.kube
        self.hv = agent.hv
        self.settings = agent.settings
        self.node = agent.settings.node_name
        self.cache: dict[Key, dict[str, Any]] = {}
        self.queue: WorkQueue[Key] = WorkQueue(
            name="vmmigrations",
            workers=4,
            on_error=cache_reporter(self.kube, "VMMigration", COMPONENT, self.cache, cas=True),
        )
        #: Jobs running in this process: the guest (to abort) and whether it was cancelled.
        self.jobs: dict[Key, Guest] = {}
        self.cancelled: set[Key] = set()
        #: Set (and dropped) when a job ends that a cancel() waits for.
        self.done: dict[Key, asyncio.Event] = {}
        #: Jobs this process aborted for exceeding ``completionTimeoutPerGiB``: their budget.
        self.timed_out: dict[Key, float] = {}
        #: Jobs this process switched to post-copy (a failure then loses the guest).
        self.post_copied: set[Key] = set()
        #: The VM's ``Migrating`` status write of a job that just started.
        self.marking: dict[Key, asyncio.Task[None]] = {}
        self.log = get_logger("virtfleet.agent.migrations", node=self.node)

    # --- signals ----------------------------------------------------------------------

    def on_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            gone = self.cache.pop(key, None) or body
            self.queue.forget(key)
            reason = str((gone.get("status") or {}).get("failureReason") or "")
            vm_name = (gone.get("spec") or {}).get("vmName")
            if reason.startswith(f"{POSTCOPY_FAILED}:") and vm_name:
                self.agent.queue.add((key[0], str(vm_name)))  # the VM loop may act again
            return
        cached = self.cache.get(key)
        if cached is not None and _resource_version(cached) > _resource_version(body):
            return
        self.cache[key] = dict(body)
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
            "migration_jobs": len(self.jobs) + len(self.marking) + len(self.post_copied),
            "migration_waits": len(self.done) + len(self.cancelled) + len(self.timed_out),
        }

    async def cancel(self, key: Key, timeout: float) -> bool:
        """For the kopf deletion handler: abort a running job; True once nothing runs."""
        guest = self.jobs.get(key)
        if guest is None:
            self.queue.add(key)
            phase = (self.cache.get(key, {}).get("status") or {}).get("phase")
            return phase not in (MigrationPhase.SCHEDULED.value, MigrationPhase.RUNNING.value)
        # Made before the abort (which yields): the job's end sets and drops this one.
        done = self.done.setdefault(key, asyncio.Event())
        self.cancelled.add(key)
        self.log.info("cancelling migration", namespace=key[0], vmmigration=key[1])
        with contextlib.suppress(hv_errors.HypervisorError):
            await hv_migration.abort(guest)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        return done.is_set()

    # --- the VM loop's guard ----------------------------------------------------------

    def _unrecovered(self, vm_key: Key) -> list[Key]:
        """Migrations of the VM out of this node that run with no job in this process."""
        return [
            key
            for key, body in self.cache.items()
            if key[0] == vm_key[0]
            and (body.get("spec") or {}).get("vmName") == vm_key[1]
            and (body.get("status") or {}).get("sourceNode") == self.node
            and (body.get("status") or {}).get("phase") == MigrationPhase.RUNNING.value
            and key not in self.jobs
        ]

    def guard(
        self, handler: Callable[[Key], Awaitable[float | None]]
    ) -> Callable[[Key], Awaitable[float | None]]:
        """The VM loop waits while a migration of the VM is ``Running`` but not (yet) ours.

        After a restart mid-migration, libvirtd may still run the job (or have finished
        it and undefined the domain here): "healing" the VM then would start a second
        copy of it. :meth:`_recover` decides first; the VM loop goes on afterwards.
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

    def _postcopy_lost(self, vm_key: Key) -> bool:
        """A migration of the VM out of this node failed after the switch to post-copy."""
        return any(
            key[0] == vm_key[0]
            and (body.get("spec") or {}).get("vmName") == vm_key[1]
            and (body.get("status") or {}).get("sourceNode") == self.node
            and (body.get("status") or {}).get("phase") == MigrationPhase.FAILED.value
            and str((body.get("status") or {}).get("failureReason") or "").startswith(
                f"{POSTCOPY_FAILED}:"
            )
            for key, body in self.cache.items()
        )

    async def _list_unrecovered(self, vm_key: Key) -> list[Key]:
        """At start-up the VM watch may be ahead of the VMMigration watch: ask the API."""
        try:
            items = await self.kube.list("VMMigration", vm_key[0])
        except KubeError:
            return []
        for item in items:
            key = key_of(item)
            cached = self.cache.get(key)
            if cached is None or _resource_version(cached) < _resource_version(item):
                self.cache[key] = dict(item)
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
        if status.phase is MigrationPhase.SCHEDULED:
            if deleting:
                await self._finish(key, "Cancelled", "deleted before it started", cancel=True)
                return None
            return await self._start(key, spec, status, log)
        if status.phase is MigrationPhase.RUNNING:
            return await self._recover(key, spec, status, log)
        return None

    async def _start(
        self, key: Key, spec: VMMigrationSpec, status: VMMigrationStatus, log: Any
    ) -> float | None:
        vm_key = (key[0], spec.vm_name)
        async with self.locks.lock(vm_key):
            vm_body = self.agent.cache.get(vm_key)
            if (vm_body is None or not self.agent.is_mine(vm_body)) and await self._cache_behind(
                vm_key
            ):
                return CACHE_BEHIND_RETRY_SECONDS
            try:
                if vm_body is None or not self.agent.is_mine(vm_body):
                    raise RefusalError("VMNotOnSource", f"the VM is not on {self.node}")
                guest = await self.hv.lookup(str(vm_body["metadata"]["uid"]))
                if spec.mode is MigrationMode.OFFLINE:
                    if guest is None:
                        raise RefusalError("VMNotDefined", f"the VM has no domain on {self.node}")
                elif guest is None or not (await guest.status()).state.active:
                    raise RefusalError("VMNotRunning", "a live migration needs a running VM")
                try:
                    vm_spec = VirtualMachineSpec.model_validate(vm_body.get("spec") or {})
                except ValidationError as exc:
                    raise RefusalError(
                        "InvalidVMSpec", f"the VM's spec is not valid: {exc.errors()[0]['msg']}"
                    ) from exc
                self._check_snapshots(key[0], spec.vm_name, vm_spec)
                dest_uri = await self._target_uri(status.target_node or "")
            except RefusalError as exc:
                log.warning("migration refused", reason=exc.reason, error=exc.message)
                await self._finish(key, exc.reason, exc.message)
                return None
            if not await self._adopt(key):
                return 1.0
            body = self.cache[key]
            wanted = running_status(status, int(body["metadata"].get("generation", 1)), _now())
            if not await self._write_status(key, wanted, cas=True):
                return 1.0  # changed meanwhile (deleted, or another writer): decide again
            log.info("migration started", target=status.target_node, uri=dest_uri)
            # The VM says Migrating while the target is prepared (one write less on the
            # job's path); awaited before anything else writes the VM (see _vm_marked).
            self.marking[key] = asyncio.create_task(
                self._vm_printable(vm_key, PrintableStatus.MIGRATING)
            )
            self.jobs[key] = guest
            try:
                if spec.mode is MigrationMode.OFFLINE:
                    await self._run_offline(key, spec, vm_body, vm_spec, guest, dest_uri, log)
                else:
                    await self._run(key, spec, vm_body, vm_spec, guest, dest_uri, log)
            finally:
                await self._vm_marked(key)
                self._job_ended(key)
        return None

    def _job_ended(self, key: Key) -> None:
        """Nothing of a job outlives it: its guest, flags, and a waiting cancel()'s event."""
        self.jobs.pop(key, None)
        self.cancelled.discard(key)
        self.timed_out.pop(key, None)
        self.post_copied.discard(key)
        ended = self.done.pop(key, None)  # only a cancel() waiting for the job made one
        if ended is not None:
            ended.set()

    async def _cache_behind(self, vm_key: Key) -> bool:
        """Whether the API says the VM is on this node although the cache does not (yet).

        Right after the agent starts, the VMMigration watch may deliver before the VM
        watch filled the cache: refusing then (``VMNotOnSource``) failed valid migrations
        for good (the chaos test saw it 0.1 s after agent restarts). An unanswered read
        counts as "behind" too: refusing is for good, waiting is not.
        """
        try:
            fresh = await self.kube.get("VirtualMachine", *vm_key)
        except NotFound:
            return False
        except KubeError as exc:
            self.log.info("cannot read the VM to check the cache", error=str(exc))
            return True
        return self.agent.is_mine(fresh)

    async def _vm_marked(self, key: Key) -> None:
        """Wait for the VM's ``Migrating`` write: no later VM write may land before it."""
        task = self.marking.pop(key, None)
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    def _check_snapshots(self, namespace: str, vm_name: str, vm_spec: VirtualMachineSpec) -> None:
        snaps = []
        for (ns, name), body in self.snaps.snapshots.items():
            if ns != namespace or (body.get("spec") or {}).get("vmName") != vm_name:
                continue
            st = VMSnapshotStatus.model_validate(body.get("status") or {})
            if st.phase is SnapshotPhase.FAILED:
                continue
            snaps.append(SnapshotOnNode(name, st.phase, st.snapshot_name, bool(st.snapshot_xml)))
        restoring = next(
            (
                name
                for (ns, name), body in self.snaps.restores.items()
                if ns == namespace
                and (body.get("spec") or {}).get("vmName") == vm_name
                and (body.get("status") or {}).get("phase") == RestorePhase.IN_PROGRESS.value
            ),
            None,
        )
        shared = all(
            (d.pool or self.settings.default_pool) in self.settings.shared_pools
            for d in vm_spec.disks
        )
        reason = snapshots_block_migration(
            snaps, shared_storage=shared, restore_in_progress=restoring
        )
        if reason is not None:
            raise RefusalError("SnapshotsBlockMigration", reason)
        if any(s.phase is SnapshotPhase.READY for s in snaps):
            raise RefusalError(
                "SnapshotsBlockMigration",
                "moving snapshot metadata along with a migration is not implemented yet: "
                "delete the VM's snapshots first",
            )

    async def _target_uri(self, target: str) -> str:
        try:
            host = await self.kube.get("VMHost", None, target)
        except NotFound as exc:
            raise RefusalError("TargetUnavailable", f"node {target} has no VMHost") from exc
        uri = (host.get("status") or {}).get("migrationURI")
        if not uri:
            raise RefusalError("TargetUnavailable", f"VMHost {target} reports no migrationURI")
        return str(uri)

    async def _run(
        self,
        key: Key,
        spec: VMMigrationSpec,
        vm_body: Mapping[str, Any],
        vm_spec: VirtualMachineSpec,
        guest: Guest,
        dest_uri: str,
        log: Any,
    ) -> None:
        uid = str(vm_body["metadata"]["uid"])
        target = Hypervisor(HypervisorSettings(uri=dest_uri, reboot_events=False, job_events=False))
        started = time.monotonic()
        job_began = False
        try:
            await target.open()
            copy_paths, shared, copied = await self._prepare_target(target, vm_body, vm_spec, uid)
            prepared = time.monotonic()
            request = hv_migration.MigrationRequest(
                dest_uri=dest_uri,
                data_uri=_data_uri(dest_uri),
                copy_disks=_disk_targets(await guest.xml(), copy_paths),
                shared_disks=shared,
                bandwidth_mibps=spec.policy.bandwidth_mibps,
                max_downtime_ms=spec.policy.max_downtime_ms,
                auto_converge=spec.policy.auto_converge,
                post_copy=spec.policy.post_copy,
            )
            budget = completion_budget(
                spec.policy.completion_timeout_per_gib, vm_spec.memory.size.bytes, copied
            )
            job_started = time.monotonic()
            job_began = True
            error = await self._migrate(key, guest, request, log, budget=budget)
            job_seconds = time.monotonic() - job_started
            await self._vm_marked(key)
            where = await self._where(uid, target)
            outcome = job_outcome(where)
            log.info(
                "migration job ended",
                outcome=outcome,
                error=error,
                prepare_s=round(prepared - started, 3),
                job_s=round(job_seconds, 3),
            )
            if outcome == "succeeded":
                await self._handoff(key, (key[0], spec.vm_name), uid, target, log)
            elif key in self.post_copied:
                # Memory is split between both nodes: never resume or restart it anywhere.
                log.error("post-copy migration failed: the guest is lost", error=error)
                await self._finish(key, POSTCOPY_FAILED, postcopy_failure_message(error))
                await self._vm_printable((key[0], spec.vm_name), PrintableStatus.FAILED)
            elif outcome == "unclear":
                # Running on both nodes or on neither (a libvirtd restarted under the job):
                # neither a hand-over nor a release is safe yet; _recover looks again.
                log.warning("migration outcome unclear; recovering", error=error)
                self.queue.add(key)
            elif key in self.cancelled:
                await self._finish(key, "Cancelled", "deleted while running", cancel=True)
                await self._vm_released((key[0], spec.vm_name))
            elif key in self.timed_out:
                limit = self.timed_out.pop(key)
                await self._finish(
                    key,
                    "CompletionTimeout",
                    f"completion timeout of {limit:.2f}s exceeded "
                    f"({spec.policy.completion_timeout_per_gib}s per GiB of RAM and copied "
                    "disk): job aborted, the VM stays on the source",
                )
                await self._vm_released((key[0], spec.vm_name))
            else:
                await self._finish(key, "MigrationFailed", error or "the job ended; VM stays")
                await self._vm_released((key[0], spec.vm_name))
        except RefusalError as exc:
            await self._finish(key, exc.reason, exc.message)
            await self._vm_released((key[0], spec.vm_name))
        except hv_errors.HypervisorError as exc:
            if job_began:
                # libvirt went away while (or just after) the job ran: it may have finished
                # and undefined the domain here. Calling it failed would let the VM loop
                # start a second copy; stay Running so that _recover decides by where the
                # domain runs once both libvirtds answer (the VM loop waits until then).
                log.warning("migration outcome unknown; recovering", error=str(exc))
                self.queue.add(key)
                return
            await self._finish(key, "TargetUnavailable", str(exc))
            await self._vm_released((key[0], spec.vm_name))
        finally:
            self.post_copied.discard(key)
            with contextlib.suppress(Exception):
                await target.close()

    async def _run_offline(
        self,
        key: Key,
        spec: VMMigrationSpec,
        vm_body: Mapping[str, Any],
        vm_spec: VirtualMachineSpec,
        guest: Guest,
        dest_uri: str,
        log: Any,
    ) -> None:
        """Mode ``Offline``: stop here, copy node-local volumes, define there, hand over.

        Graceful stop (ACPI, destroy after ``terminationGracePeriodSeconds``); the target's
        volumes are made like for a live migration and then overwritten with the source's
        bytes (download/upload streams over the two connections); the domain is defined
        on the target with the same XML before it is undefined here, so an interruption
        never leaves the VM without a definition (:func:`offline_outcome`). The target's
        VM loop starts it per ``runStrategy`` after the hand-over.
        """
        uid = str(vm_body["metadata"]["uid"])
        vm_key = (key[0], spec.vm_name)
        target = Hypervisor(HypervisorSettings(uri=dest_uri, reboot_events=False, job_events=False))
        defined = False
        try:
            await target.open()
            stop = await self.hv.graceful_stop(guest, vm_spec.termination_grace_period_seconds)
            log.info("offline migration: stopped on the source", path=str(stop.path))
            self._check_cancelled(key)
            copy_paths, _, _ = await self._prepare_target(target, vm_body, vm_spec, uid)
            copied = 0
            for disk in vm_spec.disks:
                if disk.name in copy_paths:
                    pool = disk.pool or self.settings.default_pool
                    copied += await storage.copy_volume(
                        self.hv, target, pool, volume_name(uid, disk.name)
                    )
                    self._check_cancelled(key)
            xml = await guest.xml(inactive=True)
            await self._vm_marked(key)
            await target.define(xml)
            defined = True
            try:
                await guest.undefine()
            except hv_errors.HypervisorError as exc:
                log.warning("cannot undefine the source domain", error=str(exc))
            log.info("offline migration: defined on the target", copied_bytes=copied)
            await self._handoff(key, vm_key, uid, target, log, mode=MigrationMode.OFFLINE)
        except (RefusalError, hv_errors.HypervisorError, _CancelledError) as exc:
            if not defined:
                await self._delete_target_volumes(target, vm_spec, uid)
            if isinstance(exc, _CancelledError):
                await self._finish(key, "Cancelled", "deleted while running", cancel=True)
            elif isinstance(exc, RefusalError):
                await self._finish(key, exc.reason, exc.message)
            else:
                await self._finish(key, "MigrationFailed", f"{exc}; the VM stays on the source")
            await self._vm_released(vm_key)
        finally:
            with contextlib.suppress(Exception):
                await target.close()

    def _check_cancelled(self, key: Key) -> None:
        if key in self.cancelled:
            raise _CancelledError

    async def _delete_target_volumes(
        self, target: Hypervisor, vm_spec: VirtualMachineSpec, uid: str
    ) -> None:
        """Best effort: the node-local volumes an unfinished offline job made there."""
        for disk in vm_spec.disks:
            pool = disk.pool or self.settings.default_pool
            if pool in self.settings.shared_pools:
                continue
            with contextlib.suppress(Exception):
                await storage.delete_volume(target, pool, volume_name(uid, disk.name))
        if vm_spec.cloud_init is not None:
            with contextlib.suppress(Exception):
                await storage.delete_volume(
                    target, self.settings.default_pool, seed_volume_name(uid)
                )

    async def _prepare_target(
        self, target: Hypervisor, vm_body: Mapping[str, Any], vm_spec: VirtualMachineSpec, uid: str
    ) -> tuple[dict[str, str], bool, int]:
        """Node-local volumes made on the target (same pool, same name, so the same path).

        Returns the source paths of the disks to copy, whether any disk is shared, and
        the bytes to copy (the copied volumes' capacities).
        """
        copy_paths: dict[str, str] = {}
        shared = False
        copied = 0
        for disk in vm_spec.disks:
            pool = disk.pool or self.settings.default_pool
            name = volume_name(uid, disk.name)
            if pool in self.settings.shared_pools:
                shared = True
                continue
            source = await storage.lookup_volume(self.hv, pool, name)
            if source is None:
                raise RefusalError(
                    "VolumeMissing", f"disk {disk.name!r} has no volume on {self.node}"
                )
            copy_paths[disk.name] = source.path
            copied += source.capacity
            if await storage.lookup_volume(target, pool, name) is not None:
                continue  # made by an earlier attempt: same name, same size
            if disk.source.image is not None:
                await storage.create_overlay(
                    target,
                    pool,
                    name,
                    VolumeRef(self.settings.image_pool, disk.source.image),
                    source.capacity,
                )
            else:
                await storage.create_blank(target, pool, name, source.capacity)
        if vm_spec.cloud_init is not None:
            # Read-only seed: not copied by the migration, made again (same bytes) there.
            user_data = vm_spec.cloud_init.user_data
            ref = vm_spec.cloud_init.user_data_secret_ref
            if ref is not None:
                ns = str(vm_body["metadata"]["namespace"])
                user_data = (await self.kube.get_secret_key(ns, ref.name, ref.key)).decode()
            files = seed_files(
                uid=uid,
                hostname=str(vm_body["metadata"]["name"]),
                user_data=user_data,
                network_data=vm_spec.cloud_init.network_data,
            )
            await storage.upload(
                target, self.settings.default_pool, seed_volume_name(uid), build_iso(files)
            )
        return copy_paths, shared, copied

    async def _migrate(
        self,
        key: Key,
        guest: Guest,
        request: hv_migration.MigrationRequest,
        log: Any,
        *,
        budget: float | None = None,
    ) -> str | None:
        """Run the job, publishing progress; the job's error message, if it failed.

        Past ``budget`` seconds (``completionTimeoutPerGiB``) the job is aborted once.
        """
        started = time.monotonic()
        job = asyncio.create_task(hv_migration.migrate(guest, request))
        last: MigrationProgress | None = None
        last_at = 0.0
        poll = POLL_SECONDS if budget is None else max(0.1, min(POLL_SECONDS, budget / 2))
        aborted = False
        samples: list[tuple[int, int]] = []
        while True:
            done, _ = await asyncio.wait({job}, timeout=poll)
            if done:
                break
            if not aborted and timed_out(budget, time.monotonic() - started):
                # Retried each poll until libvirt accepts it (no job yet: nothing to abort).
                self.timed_out[key] = budget or 0.0
                try:
                    await hv_migration.abort(guest)
                    aborted = True
                    log.warning("completion timeout: job aborted", budget=budget)
                except hv_errors.HypervisorError as exc:
                    log.debug("abort not accepted yet", error=str(exc))
            try:
                sample = await guest.job_progress()
            except hv_errors.HypervisorError:
                continue
            if not sample.active:
                continue
            if request.post_copy and key not in self.post_copied and not aborted:
                samples.append((sample.memory_iteration, sample.memory_remaining))
                if postcopy_due(samples):
                    try:
                        await hv_migration.start_post_copy(guest)
                        self.post_copied.add(key)
                        log.warning("pre-copy stalled: switched to post-copy", samples=samples[-3:])
                    except hv_errors.HypervisorError as exc:
                        log.debug("post-copy not accepted yet", error=str(exc))
            progress = progress_of(sample)
            if should_publish(last, progress, time.monotonic() - last_at):
                body = self.cache.get(key)
                if body is not None:
                    st = VMMigrationStatus.model_validate(body.get("status") or {})
                    await self._write_status(key, st.model_copy(update={"progress": progress}))
                last, last_at = progress, time.monotonic()
                log.debug("progress", percent=progress.percent, iteration=progress.iteration)
        try:
            job.result()
        except hv_errors.HypervisorError as exc:
            return str(exc)
        return None

    async def _where(self, uid: str, target: Hypervisor) -> DomainWhere:
        async def state(hv: Hypervisor) -> GuestStatus | None:
            guest = await hv.lookup(uid)
            if guest is None:
                return None
            try:
                return await guest.status()
            except hv_errors.NotFound:
                return None

        source, dest = await state(self.hv), await state(target)
        return DomainWhere(
            on_source=source is not None,
            source_active=source is not None and source.state.active,
            on_target=dest is not None,
            target_active=dest is not None and dest.state.active,
            source_paused_by_migration=source is not None
            and source.state is GuestState.PAUSED
            and source.reason == "migration",
            target_running=dest is not None and dest.state is GuestState.RUNNING,
        )

    async def _remove_source_leftover(self, uid: str, log: Any) -> None:
        """Whatever of the domain is still here once the guest runs on the target.

        A source libvirtd killed near the end of the job never confirms it: its copy
        stays paused, or stopped but defined (``UNDEFINE_SOURCE`` never ran). Left alone
        it would look like a second home of the VM and could be started again. A failure
        here does not undo the hand-over: the orphan sweep removes what is left.
        """
        try:
            leftover = await self.hv.lookup(uid)
            if leftover is None:
                return
            if (await leftover.status()).state.active:
                await leftover.destroy()
            await leftover.undefine()
            log.warning("removed the source's left-over copy of the migrated domain")
        except hv_errors.NotFound:
            return
        except hv_errors.HypervisorError as exc:
            log.warning("cannot remove the source's left-over copy yet", error=str(exc))

    async def _recover(
        self, key: Key, spec: VMMigrationSpec, status: VMMigrationStatus, log: Any
    ) -> float | None:
        """``Running`` but no job here: this agent restarted mid-way. Decide by the domain."""
        vm_key = (key[0], spec.vm_name)
        vm_body = self.agent.cache.get(vm_key)
        if vm_body is None:
            with contextlib.suppress(KubeError):
                vm_body = await self.kube.get("VirtualMachine", key[0], spec.vm_name)
        if vm_body is None:
            await self._finish(key, "VMNotFound", "the VM is gone")
            return None
        uid = str(vm_body["metadata"]["uid"])
        try:
            dest_uri = await self._target_uri(status.target_node or "")
        except RefusalError as exc:
            await self._finish(key, exc.reason, exc.message)
            return None
        target = Hypervisor(HypervisorSettings(uri=dest_uri, reboot_events=False, job_events=False))
        try:
            await target.open()
            async with self.locks.lock(vm_key):
                where = await self._where(uid, target)
                offline = spec.mode is MigrationMode.OFFLINE
                outcome = offline_outcome(where) if offline else job_outcome(where)
                (log.debug if outcome == "unclear" else log.info)(
                    "recovering an interrupted migration", outcome=outcome
                )
                if outcome == "succeeded":
                    await self._handoff(key, vm_key, uid, target, log, mode=spec.mode)
                elif outcome == "failed":
                    await self._finish(key, "Interrupted", "the agent restarted during the job")
                    await self._vm_released(vm_key)
                else:
                    return 5.0  # a job may still run in libvirtd: look again
        except hv_errors.HypervisorError as exc:
            log.warning("cannot look at the target", error=str(exc))
            return 5.0
        finally:
            with contextlib.suppress(Exception):
                await target.close()
        return None

    # --- hand-over --------------------------------------------------------------------

    async def _handoff(
        self,
        key: Key,
        vm_key: Key,
        uid: str,
        target: Hypervisor,
        log: Any,
        *,
        mode: MigrationMode = MigrationMode.LIVE,
    ) -> None:
        body = self.cache[key]
        status = VMMigrationStatus.model_validate(body.get("status") or {})
        node = status.target_node or ""
        downtime = await self._downtime(uid, target) if mode is MigrationMode.LIVE else None
        await self._remove_source_leftover(uid, log)
        for _ in range(10):
            try:
                vm = await self.kube.get("VirtualMachine", *vm_key)
            except NotFound:
                break
            meta = vm["metadata"]
            try:
                if (vm.get("status") or {}).get("nodeName") != node:
                    vm = await self.kube.patch_status(
                        "VirtualMachine",
                        *vm_key,
                        {"nodeName": node, "printableStatus": handoff_printable(mode)},
                        resource_version=str(meta.get("resourceVersion")),
                    )
                    meta = vm["metadata"]
                finalizers = handoff_finalizers(
                    meta.get("finalizers") or [],
                    self.settings.finalizer,
                    node_finalizer(node),
                    deleting=bool(meta.get("deletionTimestamp")),
                )
                if (meta.get("labels") or {}).get(NODE_LABEL) == node and (
                    self.settings.finalizer not in (meta.get("finalizers") or [])
                ):
                    # Let go already (a recovery, or kopf dropped the finalizer once the
                    # controller relabelled the VM): not this node's to write any more,
                    # and the target's agent adds its own finalizer.
                    break
                await self.kube.patch(
                    "VirtualMachine",
                    *vm_key,
                    {
                        "metadata": {
                            "labels": {NODE_LABEL: node},
                            "finalizers": finalizers,
                            "resourceVersion": meta.get("resourceVersion"),
                        }
                    },
                )
                break
            except Conflict:
                # Another writer (a VM status update) got in between: read again at once;
                # the guest already runs on the target, so every millisecond here is visible.
                await asyncio.sleep(CONFLICT_RETRY_SECONDS)
        self.agent.forget(vm_key)
        now = _now()
        wanted = succeeded_status(status, int(body["metadata"].get("generation", 1)), downtime, now)
        # Success first: the guest already runs on the target. The node-local volumes left
        # here are clean-up; if this process dies before it, the orphan sweep deletes them.
        await self._write_status(key, wanted)
        deleted = await self._delete_local_volumes(uid)
        log.info("migration succeeded", target=node, downtime_ms=downtime, deleted=deleted)

    async def _downtime(self, uid: str, target: Hypervisor) -> int | None:
        """The measured downtime, from the target's record of the completed incoming job."""
        import libvirt

        guest = await target.lookup(uid)
        if guest is None:
            return None
        try:
            stats = await guest.executors.run(
                guest.handle.jobStats,
                libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED,
            )
        except hv_errors.HypervisorError:
            return None
        value = stats.get("downtime")
        return int(value) if isinstance(value, int) else None

    async def _delete_local_volumes(self, uid: str) -> list[str]:
        deleted = []
        for pool in self.settings.pools:
            if pool in self.settings.shared_pools:
                continue  # the target uses these very files now
            try:
                volumes = await storage.list_volumes(self.hv, pool)
            except hv_errors.HypervisorError:
                continue
            for volume in volumes:
                if volume.name.startswith(f"{uid}-"):
                    with contextlib.suppress(hv_errors.HypervisorError):
                        await storage.delete_volume(self.hv, pool, volume.name)
                        deleted.append(f"{pool}/{volume.name}")
        return deleted

    # --- writing ----------------------------------------------------------------------

    async def _adopt(self, key: Key) -> bool:
        """Node label and this agent's finalizer: deleting the object now cancels the job."""
        body = self.cache[key]
        meta = body["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if (
            self.settings.finalizer in finalizers
            and (meta.get("labels") or {}).get(NODE_LABEL) == self.node
        ):
            return True
        if self.settings.finalizer not in finalizers:
            finalizers.append(self.settings.finalizer)
        try:
            updated = await self.kube.patch(
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
        self.cache[key] = dict(updated)
        return True

    async def _finish(self, key: Key, reason: str, message: str, *, cancel: bool = False) -> None:
        body = self.cache.get(key)
        if body is None:
            return
        status = VMMigrationStatus.model_validate(body.get("status") or {})
        phase = MigrationPhase.CANCELLED if cancel else MigrationPhase.FAILED
        wanted = failed_status(
            status, int(body["metadata"].get("generation", 1)), reason, message, _now(), phase=phase
        )
        await self._write_status(key, wanted)

    async def _write_status(
        self, key: Key, status: VMMigrationStatus, *, cas: bool = False
    ) -> bool:
        body = self.cache.get(key)
        if body is None:
            return False
        patch = status_patch(body.get("status"), status.to_wire())
        if patch is None:
            return True
        version = str(body["metadata"].get("resourceVersion")) if cas else None
        try:
            updated = await self.kube.patch_status(
                "VMMigration", *key, patch, resource_version=version
            )
        except Conflict:
            with contextlib.suppress(KubeError):
                self.cache[key] = dict(await self.kube.get("VMMigration", *key))
            return False
        except NotFound:
            return False
        self.cache[key] = dict(updated)
        return True

    async def _vm_printable(self, vm_key: Key, printable: PrintableStatus) -> None:
        """``Migrating`` while the job runs (the VM loop is locked out meanwhile)."""
        with contextlib.suppress(KubeError):
            updated = await self.kube.patch_status(
                "VirtualMachine", *vm_key, {"printableStatus": printable.value}
            )
            if vm_key in self.agent.cache:
                self.agent.cache[vm_key] = slim(updated)

    async def _vm_released(self, vm_key: Key) -> None:
        """The VM stays here: let its loop look again (and report Running)."""
        self.agent.queue.add(vm_key)


def _now() -> datetime:
    return datetime.now(UTC)


# --- kopf wiring -----------------------------------------------------------------------


def register(
    registry: kopf.OperatorRegistry,
    settings: AgentSettings,
    get: Callable[[], MigrationAgent],
) -> None:
    """Watch every VMMigration; hold this node's finalizer on those it adopted (cancel)."""
    on_node = {NODE_LABEL: settings.node_name}

    @kopf.on.event(API_GROUP, API_VERSION, "vmmigrations", registry=registry)  # type: ignore[arg-type]
    def vmmigration_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.delete(API_GROUP, API_VERSION, "vmmigrations", labels=on_node, registry=registry)
    async def vmmigration_delete(body: Any, **_: Any) -> None:
        if not await get().cancel(key_of(body), DELETE_WAIT_SECONDS):
            raise kopf.TemporaryError("cancelling the migration", delay=1)


def start(
    agent: Agent, locks: VmLocks, snaps: SnapshotAgent
) -> tuple[MigrationAgent, list[asyncio.Task[None]]]:
    migrations = MigrationAgent(agent, locks, snaps)
    tasks = [
        asyncio.create_task(migrations.queue.run(migrations.reconcile), name="vmmigration-queue"),
        asyncio.create_task(_resync(migrations), name="vmmigration-resync"),
    ]
    return migrations, tasks


async def _resync(migrations: MigrationAgent) -> None:
    while True:
        await asyncio.sleep(migrations.settings.resync_seconds)
        migrations.resync()
