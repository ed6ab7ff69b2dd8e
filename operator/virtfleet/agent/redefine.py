"""Redefining a snapshot from ``VMSnapshot.status.snapshotXML``, held to what virtfleet made.

A revert replaces the VM's domain with the ``<domain>`` inside the stored XML, so the XML
is checked (:func:`virtfleet.domain.snapshot_check.check_snapshot_xml`) against the VM's
current domain and this node's pool directories before libvirt sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from virtfleet.domain.snapshot_check import SnapshotBounds, UnsafeSnapshotError, check_snapshot_xml
from virtfleet.hypervisor import Guest, snapshots, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.reconcile.snapshot import RedefineSnapshot

if TYPE_CHECKING:
    from virtfleet.agent.agent import Agent


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
