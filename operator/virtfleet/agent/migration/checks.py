"""Why a Scheduled migration may not start here: refusals with a reason, before any work.

Each raises :class:`ActionError` (permanent); the loop ends the VMMigration ``Failed``
with its reason, and nothing was changed on either node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from virtfleet.agent.errors import ActionError
from virtfleet.agent.migration.context import MigrationContext
from virtfleet.api.migration import MigrationMode, VMMigrationSpec
from virtfleet.api.snapshot import RestorePhase, SnapshotPhase, VMSnapshotStatus
from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.hypervisor import Guest
from virtfleet.reconcile.snapshot_migration import SnapshotOnNode, snapshots_block_migration
from virtfleet.runtime.kube import NotFound


def refuse(reason: str, message: str) -> ActionError:
    return ActionError(reason, message, permanent=True)


async def check_vm(
    ctx: MigrationContext,
    spec: VMMigrationSpec,
    vm_body: Mapping[str, Any] | None,
) -> tuple[Mapping[str, Any], Guest, VirtualMachineSpec]:
    """The VM is here, has a domain (running, for a live migration) and a valid spec."""
    if vm_body is None or not ctx.mine(vm_body):
        raise refuse("VMNotOnSource", f"the VM is not on {ctx.node}")
    guest = await ctx.hv.lookup(str(vm_body["metadata"]["uid"]))
    if spec.mode is MigrationMode.OFFLINE:
        if guest is None:
            raise refuse("VMNotDefined", f"the VM has no domain on {ctx.node}")
    elif guest is None or not (await guest.status()).state.active:
        raise refuse("VMNotRunning", "a live migration needs a running VM")
    try:
        vm_spec = VirtualMachineSpec.model_validate(vm_body.get("spec") or {})
    except ValidationError as exc:
        raise refuse(
            "InvalidVMSpec", f"the VM's spec is not valid: {exc.errors()[0]['msg']}"
        ) from exc
    return vm_body, guest, vm_spec


def check_snapshots(
    ctx: MigrationContext,
    snapshots: Mapping[tuple[str, str], Mapping[str, Any]],
    restores: Mapping[tuple[str, str], Mapping[str, Any]],
    namespace: str,
    vm_name: str,
    vm_spec: VirtualMachineSpec,
) -> None:
    """Snapshots in progress, or kept inside disks a migration would not carry, block it."""
    snaps = []
    for (ns, name), body in snapshots.items():
        if ns != namespace or (body.get("spec") or {}).get("vmName") != vm_name:
            continue
        st = VMSnapshotStatus.model_validate(body.get("status") or {})
        if st.phase is SnapshotPhase.FAILED:
            continue
        snaps.append(SnapshotOnNode(name, st.phase, st.snapshot_name, bool(st.snapshot_xml)))
    restoring = next(
        (
            name
            for (ns, name), body in restores.items()
            if ns == namespace
            and (body.get("spec") or {}).get("vmName") == vm_name
            and (body.get("status") or {}).get("phase") == RestorePhase.IN_PROGRESS.value
        ),
        None,
    )
    settings = ctx.settings
    shared = all((d.pool or settings.default_pool) in settings.shared_pools for d in vm_spec.disks)
    reason = snapshots_block_migration(snaps, shared_storage=shared, restore_in_progress=restoring)
    if reason is not None:
        raise refuse("SnapshotsBlockMigration", reason)
    if any(s.phase is SnapshotPhase.READY for s in snaps):
        raise refuse(
            "SnapshotsBlockMigration",
            "moving snapshot metadata along with a migration is not implemented yet: "
            "delete the VM's snapshots first",
        )


async def target_lacks_networks(
    ctx: MigrationContext, target: str, vm_spec: VirtualMachineSpec
) -> list[str]:
    """The VM's VMNetworks the target has not realised yet (its VMHost ``networks``):
    its agent brings them up when it sees the migration; QEMU's tap there needs them."""
    wanted = {
        nic.network
        for nic in vm_spec.interfaces
        if nic.type == InterfaceType.NETWORK and nic.network is not None
    }
    if not wanted:
        return []
    host = await ctx.kube.get("VMHost", None, target)
    realised = {str(n.get("name")) for n in (host.get("status") or {}).get("networks") or ()}
    return sorted(wanted - realised)


async def target_uri(ctx: MigrationContext, target: str) -> str:
    """The target's libvirt URI from its VMHost (the P2P link and the volume set-up)."""
    try:
        host = await ctx.kube.get("VMHost", None, target)
    except NotFound as exc:
        raise refuse("TargetUnavailable", f"node {target} has no VMHost") from exc
    uri = (host.get("status") or {}).get("migrationURI")
    if not uri:
        raise refuse("TargetUnavailable", f"VMHost {target} reports no migrationURI")
    return str(uri)
