"""Redefining a snapshot from ``VMSnapshot.status.snapshotXML``, held to what virtfleet made.

A revert replaces the VM's domain with the ``<domain>`` inside the stored XML, so the XML
is checked (:func:`virtfleet.domain.snapshot_check.check_snapshot_xml`) against the VM's
current domain and this node's pool directories before libvirt sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from virtfleet.agent.errors import ActionError
from virtfleet.agent.snapshot.domain import hypervisor_failure
from virtfleet.domain.snapshot_check import SnapshotBounds, UnsafeSnapshotError, check_snapshot_xml
from virtfleet.hypervisor import Guest, snapshots, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.reconcile.snapshot_types import RedefineSnapshot, VmRef

if TYPE_CHECKING:
    from virtfleet.agent.agent import Agent

#: Reason (Stalled condition, Event) of a stored snapshot XML that is refused.
UNSAFE_SNAPSHOT_XML = "UnsafeSnapshotXML"


async def redefine_for_vm(
    agent: Agent, guest: Guest | None, action: RedefineSnapshot, namespace: str, vm: VmRef | None
) -> None:
    """:func:`redefine_checked` for a loop: every failure is an :class:`ActionError`.

    A refused XML fails for good (it will not become ours); a snapshot libvirt already
    has again is done.
    """
    if guest is None:
        return
    if vm is None:
        raise ActionError("VMNotFound", "the VirtualMachine is gone", permanent=False)
    try:
        await redefine_checked(agent, guest, action, namespace, vm.name, vm.uid)
    except UnsafeSnapshotError as exc:
        raise ActionError(
            UNSAFE_SNAPSHOT_XML,
            f"status.snapshotXML of {action.name} is not a snapshot virtfleet took of "
            f"VirtualMachine {vm.name}; it was not redefined: {exc}",
            permanent=True,
        ) from exc
    except hv_errors.AlreadyExists:
        return
    except hv_errors.HypervisorError as exc:
        raise hypervisor_failure(exc) from exc


async def redefine_checked(
    agent: Agent, guest: Guest, action: RedefineSnapshot, namespace: str, vm_name: str, uid: str
) -> None:
    """Redefine ``action.xml`` on ``guest``; :class:`UnsafeSnapshotError` when it is not ours.

    The bounds name the VM by its object (name, uid), never by what status says.
    """
    settings = agent.settings
    bounds = SnapshotBounds(
        namespace=namespace,
        name=vm_name,
        uid=uid,
        snapshot_name=action.name,
        volume_dirs=await pool_dirs(agent, settings.pools),
        image_dirs=await pool_dirs(agent, (settings.image_pool,)),
    )
    try:
        await snapshots.redefine(
            guest, action.xml, check=functools.partial(check_snapshot_xml, bounds=bounds)
        )
    except UnsafeSnapshotError as exc:
        agent.log.warning(
            "snapshot XML refused", namespace=namespace, vm=vm_name, snapshot=action.name,
            error=str(exc),
        )  # fmt: skip
        raise


async def pool_dirs(agent: Agent, pools: Iterable[str]) -> tuple[str, ...]:
    """The directories of ``pools`` on this node; a pool that cannot be read is left out."""
    out = []
    for pool in pools:
        try:
            info = await storage.pool_info(agent.hv, pool)
        except hv_errors.HypervisorError as exc:
            agent.log.warning(
                "pool not readable: no snapshot disk may be in it", pool=pool, error=str(exc)
            )
            continue
        if info.path:
            out.append(info.path)
    return tuple(out)
