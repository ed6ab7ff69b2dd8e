"""Quarantined disks: node-local disks of a VM that failed over while this node was away.

They may hold data newer than the backup the VM was restored from elsewhere, so they are
neither used nor deleted: each is copied to ``quarantined-<uid>-f<n>-<disk>.qcow2`` (``n``:
the VM's failover count, so a later failover from this node keeps its own; a name no
VM's volume has, so no sweep or later placement of the VM here can touch or reuse it),
listed in the VMHost's ``status.quarantinedVolumes``, and deleted only when a person asks
by annotating the VMHost (``virtfleet.io/delete-quarantined``: volume names, or ``all``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from virtfleet.agent.agent import Agent
from virtfleet.api.vmhost import QuarantinedVolume
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor import storage

PREFIX = "quarantined-"
#: Written once every disk of a failover is quarantined: that failover is done here, and
#: the VM's node-local volumes found later are ordinary leftovers (a later migration's).
DONE_SUFFIX = ".done"
DELETE_ANNOTATION = "virtfleet.io/delete-quarantined"


def failover_count(vm: Mapping[str, Any]) -> int:
    return int(((vm.get("status") or {}).get("failover") or {}).get("count") or 0)


def done_marker(uid: str, count: int) -> str:
    return f"{PREFIX}{uid}-f{count}{DONE_SUFFIX}"


async def quarantine_pending(agent: Agent, vm: Mapping[str, Any]) -> bool:
    """The VM's failover from this node was not quarantined here yet."""
    marker = done_marker(str(vm["metadata"]["uid"]), failover_count(vm))
    for pool in _local_pools(agent):
        try:
            if await storage.lookup_volume(agent.hv, pool, marker) is not None:
                return False
        except hv_errors.NotFound:
            continue
    return True


def _local_pools(agent: Agent) -> list[str]:
    return [p for p in agent.settings.pools if p not in agent.settings.shared_pools]


async def quarantine_volumes(agent: Agent, vm: Mapping[str, Any]) -> list[str]:
    """Keep the VM's node-local disks under quarantine names, drop its other volumes
    (the cloud-init seed: made again wherever the VM runs); returns ``pool/name`` kept."""
    uid = str(vm["metadata"]["uid"])
    count = failover_count(vm)
    kept: list[str] = []
    for pool in _local_pools(agent):
        try:
            volumes = {v.name for v in await storage.list_volumes(agent.hv, pool)}
        except hv_errors.NotFound:
            continue
        for name in sorted(volumes):
            if not name.startswith(f"{uid}-"):
                continue
            if name.endswith(".qcow2"):
                target = f"{PREFIX}{uid}-f{count}-{name.removeprefix(uid + '-')}"
                # Each original goes right after its copy: one still here was not copied
                # completely (an earlier attempt stopped half-way), so its target is redone.
                if target in volumes:
                    await storage.delete_volume(agent.hv, pool, target)
                await storage.copy_flat(agent.hv, pool, name, target)
                kept.append(f"{pool}/{target}")
                agent.log.warning("disk quarantined", pool=pool, volume=name, kept_as=target)
            await storage.delete_volume(agent.hv, pool, name)
    await storage.upload(
        agent.hv, agent.settings.default_pool, done_marker(uid, count), b"done\n", replace=True
    )
    return kept


async def list_quarantined(agent: Agent, vms: Mapping[str, str]) -> list[QuarantinedVolume]:
    """What ``status.quarantinedVolumes`` shows (``vms``: uid → namespace/name, if known)."""
    found = []
    for pool in _local_pools(agent):
        try:
            volumes = await storage.list_volumes(agent.hv, pool)
        except hv_errors.NotFound:
            continue
        for volume in volumes:
            if not volume.name.startswith(PREFIX) or volume.name.endswith(DONE_SUFFIX):
                continue
            uid = volume.name[len(PREFIX) :][:36]
            found.append(
                QuarantinedVolume(
                    pool=pool,
                    volume=volume.name,
                    uid=uid,
                    vm=vms.get(uid),
                    capacity_bytes=volume.capacity,
                )
            )
    return sorted(found, key=lambda q: (q.pool, q.volume))


async def delete_requested(agent: Agent, request: str) -> list[str]:
    """Delete the quarantined volumes named in the annotation's value (``all``: every one)."""
    wanted = {w.strip() for w in request.split(",") if w.strip()}
    deleted = []
    for item in await list_quarantined(agent, {}):
        chosen = "all" in wanted or item.volume in wanted or item.uid in wanted
        if chosen and await storage.delete_volume(agent.hv, item.pool, item.volume):
            deleted.append(f"{item.pool}/{item.volume}")
    return deleted
