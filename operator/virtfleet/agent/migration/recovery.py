"""``Running`` but no job in this process: the agent restarted mid-way.

libvirtd may still run the job, or have finished it and undefined the domain here; the
VM loop waits (:meth:`MigrationAgent.guard`) until :func:`recover` decided by where the
domain is (:func:`decide_recovery`).
"""

from __future__ import annotations

from typing import Any

from virtfleet.agent.errors import ActionError
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.migration import handoff as handoffs
from virtfleet.agent.migration.checks import target_uri
from virtfleet.agent.migration.context import MigrationContext
from virtfleet.api.migration import MigrationMode, VMMigrationSpec, VMMigrationStatus
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.reconcile.migration_job import (
    RECOVERY_RETRY_SECONDS,
    Fail,
    HandOver,
    JobOutcome,
    Recover,
    decide_recovery,
    job_outcome,
    offline_outcome,
)
from virtfleet.runtime.kube import KubeError, NotFound


async def recover(
    ctx: MigrationContext,
    locks: VmLocks,
    key: Key,
    spec: VMMigrationSpec,
    status: VMMigrationStatus,
    log: Any,
) -> float | None:
    vm_key = (key[0], spec.vm_name)
    vm_body = ctx.agent.cache.get(vm_key)
    if vm_body is None:
        try:
            vm_body = await ctx.kube.get("VirtualMachine", key[0], spec.vm_name)
        except KubeError as exc:
            log.info("cannot read the VM of an interrupted migration", error=str(exc))
    if vm_body is None:
        await ctx.fail(key, vm_key, Fail("VMNotFound", "the VM is gone", release_vm=False))
        return None
    uid = str(vm_body["metadata"]["uid"])
    try:
        dest_uri = await target_uri(ctx, status.target_node or "")
    except ActionError as exc:
        await ctx.fail(key, vm_key, Fail(exc.reason, exc.message, release_vm=False))
        return None
    target = ctx.target(dest_uri)
    try:
        await target.open()
        async with locks.lock(vm_key):
            where = await handoffs.where(ctx.hv, target, uid)
            offline = spec.mode is MigrationMode.OFFLINE
            handed_over = False
            if not offline and where.source_running and where.target_running:
                # Which copy is the VM is the API's word: read it, never from a cache.
                placed = await _placed_on(ctx, vm_key, log)
                if placed is None:
                    return RECOVERY_RETRY_SECONDS
                handed_over = placed == status.target_node
            outcome = (
                offline_outcome(where) if offline else job_outcome(where, handed_over=handed_over)
            )
            (log.debug if outcome is JobOutcome.UNCLEAR else log.info)(
                "recovering an interrupted migration", outcome=outcome.value
            )
            end = decide_recovery(outcome)
            if isinstance(end, HandOver):
                if not await handoffs.handoff(ctx, key, vm_key, uid, target, log, mode=spec.mode):
                    return RECOVERY_RETRY_SECONDS
            elif isinstance(end, Recover):
                return end.delay  # a job may still run in libvirtd: look again
            elif end.remove_target_copy and not await _still_split(ctx, target, uid):
                return RECOVERY_RETRY_SECONDS  # it changed while we looked: look again
            elif end.remove_target_copy and not await handoffs.remove_target_copy(
                ctx, target, uid, log
            ):
                return RECOVERY_RETRY_SECONDS
            else:
                await ctx.fail(key, vm_key, end)
    except hv_errors.HypervisorError as exc:
        log.warning("cannot look at the target", error=str(exc))
        return RECOVERY_RETRY_SECONDS
    finally:
        await ctx.close_target(target)
    return None


async def _placed_on(ctx: MigrationContext, vm_key: Key, log: Any) -> str | None:
    """The VM's ``status.nodeName`` as the apiserver has it now ("" for a VM gone; None:
    cannot tell now)."""
    try:
        vm = await ctx.kube.get("VirtualMachine", *vm_key)
    except NotFound:
        return ""
    except KubeError as exc:
        log.info("cannot read the VM to settle a split", error=str(exc))
        return None
    return str((vm.get("status") or {}).get("nodeName") or "")


async def _still_split(ctx: MigrationContext, target: Hypervisor, uid: str) -> bool:
    """Both copies still run, looked at once more right before one is destroyed."""
    where = await handoffs.where(ctx.hv, target, uid)
    return where.source_running and where.target_running
