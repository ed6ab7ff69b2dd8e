"""The end of a successful job: the VM's node, label and finalizer move to the target.

``status.nodeName`` first (compare-and-swap), then the label and the finalizer swap
(``agent-<source>`` → ``agent-<target>``) in one metadata write with a resourceVersion;
then this node forgets the VM and deletes its node-local volumes. Also where a domain
is (:func:`where`), which both the end of a job and the recovery decide by.
"""

from __future__ import annotations

import asyncio
from typing import Any

from virtfleet.agent.migration.context import MigrationContext, now
from virtfleet.api.migration import MigrationMode
from virtfleet.hypervisor import GuestState, GuestStatus, Hypervisor, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor import migration as hv_migration
from virtfleet.identity import NODE_LABEL, Key, node_finalizer
from virtfleet.reconcile.migration import succeeded_status
from virtfleet.reconcile.migration_job import DomainWhere, handoff_printable
from virtfleet.runtime.kube import Conflict, NotFound

#: Pause before re-reading the VM when a hand-over write met a conflict.
CONFLICT_RETRY_SECONDS = 0.01
#: Hand-over writes tried this often before the orphan sweeps are left to finish it.
HANDOFF_ATTEMPTS = 10


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


async def where(source: Hypervisor, target: Hypervisor, uid: str) -> DomainWhere:
    """Where the VM's domain is defined and runs, on both nodes."""

    async def state(hv: Hypervisor) -> GuestStatus | None:
        guest = await hv.lookup(uid)
        if guest is None:
            return None
        try:
            return await guest.status()
        except hv_errors.NotFound:
            return None

    # The target first: its vCPUs run only after the source paused for good (pre-copy)
    # or in post-copy (the source stays paused), so a source seen running *after* a
    # running target is a real resume, never a job caught mid-switch-over.
    there = await state(target)
    here = await state(source)
    return DomainWhere(
        on_source=here is not None,
        source_active=here is not None and here.state.active,
        on_target=there is not None,
        target_active=there is not None and there.state.active,
        source_paused_by_migration=here is not None
        and here.state is GuestState.PAUSED
        and here.reason == "migration",
        target_running=there is not None and there.state is GuestState.RUNNING,
        source_running=here is not None and here.state is GuestState.RUNNING,
    )


async def handoff(
    ctx: MigrationContext,
    key: Key,
    vm_key: Key,
    uid: str,
    target: Hypervisor,
    log: Any,
    *,
    mode: MigrationMode = MigrationMode.LIVE,
) -> bool:
    """Give the VM to the target; False (the migration stays ``Running``) while a copy
    of the guest here may still run: the recovery looks again.

    The VM names the target *first*: from then on the API says which copy is the VM,
    and a copy here that this node's libvirtd resumes later (its restart cancels a job
    it finds mid-way and resumes the domain) is a left-over the recovery removes
    (:func:`~virtfleet.reconcile.migration_job.job_outcome`: a split after the hand-over
    goes to the target, which has run the guest since the switch-over).
    """
    status = ctx.status_of(key)
    generation = ctx.generation_of(key)
    node = status.target_node or ""
    if not node:
        log.error("no target node to hand the VM to; the recovery looks again")
        return False
    downtime = await _downtime(target, uid) if mode is MigrationMode.LIVE else None
    await _move_vm(ctx, vm_key, node, mode)
    if not await remove_source_leftover(ctx, uid, log):
        return False
    ctx.agent.forget(vm_key)
    wanted = succeeded_status(status, generation, downtime, now())
    # Success first: the guest already runs on the target. The node-local volumes left
    # here are clean-up; if this process dies before it, the orphan sweep deletes them.
    await ctx.write_status(key, wanted)
    deleted = await delete_local_volumes(ctx, uid)
    log.info("migration succeeded", target=node, downtime_ms=downtime, deleted=deleted)
    return True


async def _move_vm(ctx: MigrationContext, vm_key: Key, node: str, mode: MigrationMode) -> None:
    """``status.nodeName``, then label and finalizers, each against a resourceVersion."""
    for _ in range(HANDOFF_ATTEMPTS):
        try:
            vm = await ctx.kube.get("VirtualMachine", *vm_key)
        except NotFound:
            return
        meta = vm["metadata"]
        try:
            if (vm.get("status") or {}).get("nodeName") != node:
                vm = await ctx.kube.patch_status(
                    "VirtualMachine",
                    *vm_key,
                    {"nodeName": node, "printableStatus": handoff_printable(mode)},
                    resource_version=str(meta.get("resourceVersion")),
                )
                meta = vm["metadata"]
            finalizers = handoff_finalizers(
                meta.get("finalizers") or [],
                ctx.settings.finalizer,
                node_finalizer(node),
                deleting=bool(meta.get("deletionTimestamp")),
            )
            if (meta.get("labels") or {}).get(NODE_LABEL) == node and (
                ctx.settings.finalizer not in (meta.get("finalizers") or [])
            ):
                # Let go already (a recovery, or kopf dropped the finalizer once the
                # controller relabelled the VM): not this node's to write any more,
                # and the target's agent adds its own finalizer.
                return
            await ctx.kube.patch(
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
            return
        except Conflict:
            # Another writer (a VM status update) got in between: read again at once;
            # the guest already runs on the target, so every millisecond here is visible.
            await asyncio.sleep(CONFLICT_RETRY_SECONDS)


async def remove_source_leftover(ctx: MigrationContext, uid: str, log: Any) -> bool:
    """Whatever of the domain is still here once the guest runs on the target; False
    while a copy here may still run (this libvirtd could not be asked, or refused the
    destroy). A definition left after the destroy is the orphan sweep's.

    A source libvirtd killed near the end of the job never confirms it: its copy
    stays paused, or stopped but defined (``UNDEFINE_SOURCE`` never ran). Left alone
    it would look like a second home of the VM and could be started again — or be
    resumed by this libvirtd's own recovery of the job when it restarts.
    """
    try:
        leftover = await ctx.hv.lookup(uid)
        if leftover is None:
            return True
        if (await leftover.status()).state.active:
            await leftover.destroy()
    except hv_errors.NotFound:
        return True
    except hv_errors.HypervisorError as exc:
        log.warning("cannot remove the source's left-over copy yet", error=str(exc))
        return False
    try:
        await leftover.undefine()
    except hv_errors.NotFound:
        pass  # gone meanwhile
    except hv_errors.HypervisorError as exc:
        log.warning("left-over definition stays for the orphan sweep", error=str(exc))
        return True
    log.warning("removed the source's left-over copy of the migrated domain")
    return True


async def remove_target_copy(ctx: MigrationContext, target: Hypervisor, uid: str, log: Any) -> bool:
    """Destroy and undefine the domain libvirt left running on the target, and delete
    its node-local volumes there; False if the target did not let it (look again)."""
    try:
        copy = await target.lookup(uid)
        if copy is not None:
            if (await copy.status()).state.active:
                await copy.destroy()
            await copy.undefine()
    except hv_errors.NotFound:
        pass  # gone meanwhile: what was asked
    except hv_errors.HypervisorError as exc:
        log.warning("cannot destroy the target's copy of the guest yet", error=str(exc))
        return False
    deleted = await delete_local_volumes(ctx, uid, target)
    log.error(
        "the guest ran on both nodes: removed the target's copy, the source keeps the VM",
        deleted=deleted,
    )
    return True


async def _downtime(target: Hypervisor, uid: str) -> int | None:
    guest = await target.lookup(uid)
    if guest is None:
        return None
    try:
        return await hv_migration.completed_downtime_ms(guest)
    except hv_errors.HypervisorError:
        return None  # no record (an older libvirt, or the target restarted): not reported


async def delete_local_volumes(
    ctx: MigrationContext, uid: str, hv: Hypervisor | None = None
) -> list[str]:
    """The VM's node-local volumes on ``hv`` (default: here, once the target has its own
    copies); shared-pool volumes are the disks the remaining copy uses."""
    hv = hv or ctx.hv
    deleted = []
    for pool in ctx.settings.pools:
        if pool in ctx.settings.shared_pools:
            continue  # the other node uses these very files
        try:
            volumes = await storage.list_volumes(hv, pool)
        except hv_errors.HypervisorError as exc:
            ctx.log.warning("cannot list a pool for clean-up", pool=pool, error=str(exc))
            continue
        for volume in volumes:
            if not volume.name.startswith(f"{uid}-"):
                continue
            try:
                await storage.delete_volume(hv, pool, volume.name)
            except hv_errors.HypervisorError as exc:
                ctx.log.warning(
                    "cannot delete a migrated volume", volume=volume.name, error=str(exc)
                )
                continue
            deleted.append(f"{pool}/{volume.name}")
    return deleted
