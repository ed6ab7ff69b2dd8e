"""The VM's domain as the snapshot and restore loops see it, and libvirt failures.

Both loops observe the domain before every decision (:func:`observe_domain`) and turn
hypervisor errors into :class:`~virtfleet.agent.errors.ActionError` the same way
(:func:`hypervisor_failure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from virtfleet.agent.driver import power_of
from virtfleet.agent.errors import ActionError
from virtfleet.agent.volumes import volume_name
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.hypervisor import Guest, Hypervisor, snapshots, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.logs import get_logger
from virtfleet.reconcile.snapshot_types import DomainFacts, LibvirtSnapshot

_log = get_logger("virtfleet.agent.snapshots")

#: Observe → decide → act passes of one reconcile before it gives its worker back.
MAX_PASSES = 8
#: A reconcile that lost a compare-and-swap, or used up its passes, looks again this soon.
CONFLICT_RETRY_SECONDS = 0.5
#: A transient action failure (libvirt busy or away, a list refused) is retried this late.
ACTION_RETRY_SECONDS = 5.0


def hypervisor_failure(exc: hv_errors.HypervisorError) -> ActionError:
    """A lost connection is worth retrying; any other libvirt refusal is not."""
    transient = isinstance(exc, hv_errors.ConnectionLost)
    return ActionError(type(exc).__name__, str(exc), permanent=not transient)


async def observe_domain(
    hv: Hypervisor,
    default_pool: str,
    vm_uid: str | None,
    name: str | None,
    *,
    want_xml: bool = False,
    vm_body: Mapping[str, Any] | None = None,
) -> tuple[DomainFacts, Guest | None]:
    """The VM's domain, after any job another (maybe dead) client started has ended."""
    guest = await hv.lookup(vm_uid) if vm_uid else None
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
    disks = (
        await _disks(hv, default_pool, vm_uid or "", vm_body)
        if info is not None and want_xml
        else ()
    )
    return (
        DomainFacts(
            defined=True,
            power=power,
            reason=state.reason,
            snapshot=None
            if info is None
            else LibvirtSnapshot(
                info.name, info.state, info.has_memory, info.creation_time, info.description
            ),
            snapshot_xml=xml,
            restore_marker=marker,
            current_snapshot=current.name if current else None,
            disks=disks,
        ),
        guest,
    )


async def _disks(
    hv: Hypervisor, default_pool: str, vm_uid: str, vm_body: Mapping[str, Any] | None
) -> tuple[tuple[str, int | None, int | None], ...]:
    """(name, size, allocation) of the VM's disks; a volume that cannot be read has None."""
    if vm_body is None:
        return ()
    try:
        spec = VirtualMachineSpec.model_validate(vm_body.get("spec") or {})
    except ValidationError:
        return ()
    out = []
    for disk in spec.disks:
        pool = disk.pool or default_pool
        try:
            volume = await storage.lookup_volume(hv, pool, volume_name(vm_uid, disk.name))
        except hv_errors.HypervisorError as exc:
            _log.info("disk volume not readable", pool=pool, disk=disk.name, error=str(exc))
            volume = None
        out.append(
            (
                disk.name,
                volume.capacity if volume else None,
                volume.allocation if volume else None,
            )
        )
    return tuple(out)
