"""Mode ``Offline``: stop here, copy node-local volumes, define there, hand over.

Graceful stop (ACPI, destroy after ``terminationGracePeriodSeconds``); the target's
volumes are made like for a live migration and then overwritten with the source's bytes
(download/upload streams over the two connections); the domain is defined on the target
with the same XML before it is undefined here, so an interruption never leaves the VM
without a definition (:func:`offline_outcome`). The target's VM loop starts it per
``runStrategy`` after the hand-over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from virtfleet.agent.errors import ActionError
from virtfleet.agent.migration import handoff as handoffs
from virtfleet.agent.migration import target as targets
from virtfleet.agent.migration.context import MigrationContext
from virtfleet.agent.migration.jobs import RunningJob
from virtfleet.agent.volumes import volume_name
from virtfleet.api.migration import MigrationMode, VMMigrationSpec
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.hypervisor import Hypervisor, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.reconcile.migration_job import OfflineStop, decide_offline_stop


class CancelledError(Exception):
    """The VMMigration was deleted during an offline job (checked between its steps)."""


def _check_cancelled(job: RunningJob) -> None:
    if job.state.cancelled:
        raise CancelledError


async def run_offline(
    ctx: MigrationContext,
    job: RunningJob,
    key: Key,
    spec: VMMigrationSpec,
    vm_body: Mapping[str, Any],
    vm_spec: VirtualMachineSpec,
    dest_uri: str,
    log: Any,
) -> None:
    uid = str(vm_body["metadata"]["uid"])
    vm_key = (key[0], spec.vm_name)
    target = ctx.target(dest_uri)
    defined = False
    try:
        await target.open()
        await _copy(ctx, job, target, vm_body, vm_spec, uid, log)
        xml = await job.guest.xml(inactive=True)
        await job.marked()
        await target.define(xml)
        defined = True
        try:
            await job.guest.undefine()
        except hv_errors.HypervisorError as exc:
            log.warning("cannot undefine the source domain", error=str(exc))
        log.info("offline migration: defined on the target")
        if not await handoffs.handoff(
            ctx, key, vm_key, uid, target, log, mode=MigrationMode.OFFLINE
        ):
            ctx.requeue(key)  # the recovery finishes it (defined there, nothing runs here)
    except (ActionError, hv_errors.HypervisorError, CancelledError) as exc:
        if not defined:
            await targets.delete_target_volumes(ctx, target, vm_spec, uid)
        if isinstance(exc, CancelledError):
            end = decide_offline_stop(OfflineStop.CANCELLED, "")
        elif isinstance(exc, ActionError):
            end = decide_offline_stop(OfflineStop.REFUSED, exc.message, reason=exc.reason)
        else:
            end = decide_offline_stop(OfflineStop.HYPERVISOR_ERROR, str(exc))
        await ctx.fail(key, vm_key, end)
    finally:
        await ctx.close_target(target)


async def _copy(
    ctx: MigrationContext,
    job: RunningJob,
    target: Hypervisor,
    vm_body: Mapping[str, Any],
    vm_spec: VirtualMachineSpec,
    uid: str,
    log: Any,
) -> None:
    """Stop the guest here, then copy each node-local volume (cancellable between steps)."""
    stop = await ctx.hv.graceful_stop(job.guest, vm_spec.termination_grace_period_seconds)
    log.info("offline migration: stopped on the source", path=str(stop.path))
    _check_cancelled(job)
    prepared = await targets.prepare_target(ctx, target, vm_body, vm_spec, uid)
    copied = 0
    for disk in vm_spec.disks:
        if disk.name in prepared.copy_paths:
            pool = disk.pool or ctx.settings.default_pool
            copied += await storage.copy_volume(ctx.hv, target, pool, volume_name(uid, disk.name))
            _check_cancelled(job)
    log.info("offline migration: volumes copied", copied_bytes=copied)
