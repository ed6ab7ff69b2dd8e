"""A live migration job: prepare the target, run ``migrateToURI3`` while polling, end it.

The job runs in the long executor while this polls ``jobStats()`` every second and
acts on :func:`decide_poll` (completion-timeout abort, post-copy switch, progress
writes at most every 1.5 s). Its end is :func:`decide_job_end` of where the domain is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from virtfleet.agent.errors import ActionError
from virtfleet.agent.migration import handoff as handoffs
from virtfleet.agent.migration import target as targets
from virtfleet.agent.migration.context import MigrationContext
from virtfleet.agent.migration.jobs import RunningJob
from virtfleet.api.migration import MigrationProgress, VMMigrationSpec
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor import migration as hv_migration
from virtfleet.identity import Key
from virtfleet.reconcile.migration_job import (
    Fail,
    HandOver,
    JobEnd,
    Recover,
    completion_budget,
    decide_job_end,
    decide_job_error,
    decide_poll,
    job_outcome,
    poll_interval,
    should_abort,
)


async def run_live(
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
    target = ctx.target(dest_uri)
    try:
        end, error = await _job(ctx, job, key, spec, vm_body, vm_spec, target, dest_uri, log)
        await apply_end(ctx, key, (key[0], spec.vm_name), uid, target, end, log, error=error)
    finally:
        await ctx.close_target(target)


async def _job(
    ctx: MigrationContext,
    job: RunningJob,
    key: Key,
    spec: VMMigrationSpec,
    vm_body: Mapping[str, Any],
    vm_spec: VirtualMachineSpec,
    target: Hypervisor,
    dest_uri: str,
    log: Any,
) -> tuple[JobEnd, str | None]:
    """Observe (prepare, run, look where the domain is) and decide; no end acted on."""
    uid = str(vm_body["metadata"]["uid"])
    started = time.monotonic()
    job_began = False
    try:
        await target.open()
        prepared = await targets.prepare_target(ctx, target, vm_body, vm_spec, uid)
        prepared_at = time.monotonic()
        request = hv_migration.MigrationRequest(
            dest_uri=dest_uri,
            data_uri=targets.data_uri(dest_uri),
            copy_disks=targets.disk_targets(await job.guest.xml(), prepared.copy_paths),
            shared_disks=prepared.shared,
            bandwidth_mibps=spec.policy.bandwidth_mibps,
            max_downtime_ms=spec.policy.max_downtime_ms,
            auto_converge=spec.policy.auto_converge,
            post_copy=spec.policy.post_copy,
        )
        budget = completion_budget(
            spec.policy.completion_timeout_per_gib,
            vm_spec.memory.size.bytes,
            prepared.copied_bytes,
        )
        job_began = True
        error = await migrate(ctx, key, job, request, log, budget=budget)
        job_seconds = time.monotonic() - prepared_at
        await job.marked()
        outcome = job_outcome(await handoffs.where(ctx.hv, target, uid))
        if ctx.agent.metrics is not None:
            ctx.agent.metrics.migration_ended(outcome.value, job_seconds)
        log.info(
            "migration job ended",
            outcome=outcome.value,
            error=error,
            prepare_s=round(prepared_at - started, 3),
            job_s=round(job_seconds, 3),
        )
        end = decide_job_end(
            outcome, job.state, error, timeout_per_gib=spec.policy.completion_timeout_per_gib
        )
        return end, error
    except ActionError as exc:
        return Fail(exc.reason, exc.message), exc.message
    except hv_errors.HypervisorError as exc:
        return decide_job_error(str(exc), job_began=job_began), str(exc)


async def apply_end(
    ctx: MigrationContext,
    key: Key,
    vm_key: Key,
    uid: str,
    target: Hypervisor,
    end: JobEnd,
    log: Any,
    *,
    error: str | None = None,
) -> None:
    """Carry out a live job's end (the recovery acts on its own, since it also returns a
    delay for the queue)."""
    if isinstance(end, HandOver):
        if not await handoffs.handoff(ctx, key, vm_key, uid, target, log):
            ctx.requeue(key)  # a copy here could not be removed: the recovery looks again
    elif isinstance(end, Recover):
        # Running on both nodes or on neither, or libvirt went away under the job:
        # neither a hand-over nor a release is safe yet; the recovery looks again.
        log.warning("migration outcome unclear; recovering", error=error)
        ctx.requeue(key)
    else:
        if end.remove_target_copy and not await handoffs.remove_target_copy(ctx, target, uid, log):
            ctx.requeue(key)  # the recovery sees the same split and tries again
            return
        if end.vm_printable is not None:
            log.error("post-copy migration failed: the guest is lost", error=end.message)
        await ctx.fail(key, vm_key, end)


async def migrate(
    ctx: MigrationContext,
    key: Key,
    job: RunningJob,
    request: hv_migration.MigrationRequest,
    log: Any,
    *,
    budget: float | None = None,
) -> str | None:
    """Run the job, acting on each poll's decision; the job's error message, if it failed."""
    started = time.monotonic()
    task = asyncio.create_task(hv_migration.migrate(job.guest, request))
    poll = poll_interval(budget)
    vm_name = str((ctx.cache.get(key, {}).get("spec") or {}).get("vmName") or "")
    try:
        await _poll(ctx, key, job, request, log, task, vm_name, budget, started, poll)
    finally:
        ctx.agent.migration_samples.pop(key, None)
    try:
        task.result()
    except hv_errors.HypervisorError as exc:
        return str(exc)
    return None


async def _poll(
    ctx: MigrationContext,
    key: Key,
    job: RunningJob,
    request: hv_migration.MigrationRequest,
    log: Any,
    task: asyncio.Task[None],
    vm_name: str,
    budget: float | None,
    started: float,
    poll: float,
) -> None:
    """Sample the job until it ends: publish progress, abort on time-out, post-copy."""
    last: MigrationProgress | None = None
    last_at = 0.0
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll)
        if done:
            break
        if should_abort(job.state, budget, time.monotonic() - started):
            await _abort_for_timeout(job, budget, log)
        try:
            sample = await job.guest.job_progress()
        except hv_errors.HypervisorError as exc:
            log.debug("no job sample this time", error=str(exc))
            continue
        ctx.agent.migration_samples[key] = (vm_name, sample)  # for /metrics
        decision = decide_poll(
            job.state,
            sample,
            post_copy_allowed=request.post_copy,
            last_published=last,
            seconds_since_published=time.monotonic() - last_at,
        )
        if decision.start_post_copy:
            await _start_post_copy(job, log)
        if decision.publish is not None:
            if key in ctx.cache:
                status = ctx.status_of(key).model_copy(update={"progress": decision.publish})
                await ctx.write_status(key, status)
            last, last_at = decision.publish, time.monotonic()
            log.debug("progress", percent=last.percent, iteration=last.iteration)


async def _abort_for_timeout(job: RunningJob, budget: float | None, log: Any) -> None:
    """Retried each poll until libvirt accepts it (no job yet: nothing to abort)."""
    job.state.timed_out_budget = budget or 0.0
    try:
        await hv_migration.abort(job.guest)
    except hv_errors.HypervisorError as exc:
        log.debug("abort not accepted yet", error=str(exc))
        return
    job.state.aborted = True
    log.warning("completion timeout: job aborted", budget=budget)


async def _start_post_copy(job: RunningJob, log: Any) -> None:
    try:
        await hv_migration.start_post_copy(job.guest)
    except hv_errors.HypervisorError as exc:
        log.debug("post-copy not accepted yet", error=str(exc))
        return
    job.state.post_copied = True
    log.warning("pre-copy stalled: switched to post-copy", samples=job.state.samples[-3:])
