"""What the agent does for its node as a whole: the VMHost heartbeat and the orphan sweep."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Container
from datetime import UTC, datetime
from typing import Any

from virtfleet.agent import quarantine
from virtfleet.agent.agent import COMPONENT, Agent
from virtfleet.api.conditions import ConditionStatus, rfc3339, set_condition
from virtfleet.api.migration import MigrationPhase
from virtfleet.api.quantity import format_bytes
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.api.vmhost import FencingStatus, PoolStatus, RealisedNetwork, VMHostStatus
from virtfleet.hypervisor import Guest, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import NODE_LABEL, Key
from virtfleet.reconcile.failover import failed_over_from
from virtfleet.reconcile.leftovers import unwanted_domain, unwanted_volume
from virtfleet.runtime.kube import NotFound

_UID_PREFIX = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")


async def host_status(
    agent: Agent, previous: VMHostStatus | None, quarantined_vms: dict[str, str] | None = None
) -> VMHostStatus:
    """This node's VMHost status: capacity, use, versions, pools, images, heartbeat,
    fencing, quarantined disks."""
    facts = await agent.hv.host_facts()
    pools = []
    for name in (*agent.settings.pools, agent.settings.image_pool):
        try:
            info = await storage.pool_info(agent.hv, name)
        except hv_errors.NotFound:
            continue
        pools.append(
            PoolStatus(
                name=name,
                shared=name in agent.settings.shared_pools or None,
                capacity_bytes=info.capacity,
                available_bytes=info.available,
            )
        )
    try:
        images = sorted(
            v.name for v in await storage.list_volumes(agent.hv, agent.settings.image_pool)
        )
    except hv_errors.NotFound:
        images = []
    allocated = 0
    for body in agent.cache.values():
        try:
            allocated += VirtualMachineSpec.model_validate(body.get("spec") or {}).memory.size.bytes
        except ValueError:
            continue
    now = rfc3339(datetime.now(UTC))
    conditions = set_condition(
        previous.conditions if previous else [],
        type="Ready",
        status=ConditionStatus.TRUE,
        reason="AgentRunning",
        message=f"libvirt {facts.libvirt_version} answers at {agent.settings.libvirt_uri}",
        now=now,
    )
    s = agent.settings
    fencing = FencingStatus(
        lease=f"{s.lease_namespace}/virtfleet-agent-{s.node_name}",
        self_fence_after_seconds=s.self_fence_after,
        watchdog=s.watchdog_path,
        watchdog_timeout_seconds=s.watchdog_timeout_seconds if s.watchdog_path else None,
    )
    return VMHostStatus(
        fencing=fencing,
        quarantined_volumes=await quarantine.list_quarantined(agent, quarantined_vms or {}),
        cpus=facts.cpus,
        memory_bytes=facts.memory_bytes,
        free_memory_bytes=facts.free_memory_bytes,
        allocated_memory_bytes=allocated,
        memory=format_bytes(facts.memory_bytes),
        free_memory=format_bytes(facts.free_memory_bytes),
        allocated_memory=format_bytes(allocated),
        vm_count=len(agent.cache),
        hypervisor=agent.settings.domain_type,
        libvirt_version=facts.libvirt_version,
        qemu_version=facts.hypervisor_version,
        migration_uri=agent.settings.migration_uri or agent.settings.libvirt_uri,
        tunnel_address=agent.settings.tunnel_address,
        networks=[
            RealisedNetwork(name=name, vni=vni)
            for name, vni in sorted(agent.networks.realised.items())
        ],
        heartbeat_time=now,
        pools=pools,
        images=images,
        conditions=conditions,
    )


async def heartbeat(
    agent: Agent, previous: VMHostStatus | None, quarantined_vms: dict[str, str] | None = None
) -> VMHostStatus:
    status = await host_status(agent, previous, quarantined_vms)
    body = await agent.kube.upsert_vmhost_status(agent.settings.node_name, status.to_wire())
    request = ((body.get("metadata") or {}).get("annotations") or {}).get(
        quarantine.DELETE_ANNOTATION
    )
    if request:
        await _delete_quarantined(agent, body, str(request))
    return status


async def _delete_quarantined(agent: Agent, body: dict[str, Any], request: str) -> None:
    """A person asked (VMHost annotation) to delete quarantined disks: do it, say so."""
    deleted = await quarantine.delete_requested(agent, request)
    await agent.kube.patch_metadata(
        "VMHost", None, agent.settings.node_name, annotations={quarantine.DELETE_ANNOTATION: None}
    )
    message = (
        f"quarantined disks deleted on request: {', '.join(deleted)}"
        if deleted
        else f"no quarantined disk matches {request!r}"
    )
    agent.log.warning("quarantined disks deleted", deleted=deleted, request=request)
    await agent.kube.record_event(body, "Normal", "QuarantineDeleted", message, COMPONENT)


async def sweep_orphans(agent: Agent) -> list[str]:
    """Remove domains and volumes virtfleet made for VMs that no longer want them.

    Domains and volumes are listed *before* the migrations, and those before the VMs, so
    anything created for a VM after the listing started belongs to a VM the listing
    sees, and a hand-over finished meanwhile is seen as finished; a domain is only
    removed after a direct read of its VM agrees (DESIGN §3.3). Domains without the
    virtfleet owner marker are never listed, hence never touched.
    """
    owned = await agent.hv.list_owned()
    volumes: list[tuple[str, str, str]] = []
    for pool in agent.settings.pools:
        try:
            for volume in await storage.list_volumes(agent.hv, pool):
                match = _UID_PREFIX.match(volume.name)
                if match:
                    volumes.append((pool, volume.name, match.group(1)))
        except hv_errors.NotFound:
            continue
    migrating = {
        (str(m["metadata"]["namespace"]), str((m.get("spec") or {}).get("vmName")))
        for m in await agent.kube.list("VMMigration")
        if (m.get("status") or {}).get("phase") in _UNFINISHED_MIGRATION
    }
    cached = {key: str(body["metadata"]["uid"]) for key, body in agent.cache.items()}
    vms = await _vms_for(agent, {v[2] for v in volumes} | {item.guest.uuid for item in owned})
    _forget_vanished(agent, cached, vms)

    removed: list[str] = []
    domains_here = {item.guest.uuid for item in owned}
    for item in owned:
        uid = item.guest.uuid
        attributes: dict[str, Any] = dict(item.attributes)
        namespace, name = str(attributes.get("namespace", "")), str(attributes.get("name", ""))
        if not await _unwanted(agent, item.guest, vms.get(uid), uid, migrating):
            continue
        vm = None
        if namespace and name:
            try:
                vm = await agent.kube.get("VirtualMachine", namespace, name)
            except NotFound:
                vm = None
        reason = await _unwanted(agent, item.guest, vm, uid, migrating)
        if reason is None:
            continue
        try:
            await agent.hv.graceful_stop(item.guest, 0)
            await item.guest.undefine()
        except hv_errors.NotFound:
            continue
        agent.log.warning("removed orphan domain", domain=item.guest.name, uid=uid, why=reason)
        removed.append(f"domain/{item.guest.name}")
        domains_here.discard(uid)
    pending: set[str] = set()
    for uid, vm in vms.items():
        if (
            failed_over_from(vm, agent.settings.node_name) is None
            or (str(vm["metadata"]["namespace"]), str(vm["metadata"]["name"])) in migrating
            or not any(v[2] == uid and v[0] not in agent.settings.shared_pools for v in volumes)
            or not await quarantine.quarantine_pending(agent, vm)
        ):
            continue
        pending.add(uid)
        # A recovery cut short (an agent restart after the fence mark was cleared) left
        # them: they are quarantined, as the recovery would have done.
        if uid not in domains_here:
            kept = await quarantine.quarantine_volumes(agent, vm)
            removed.extend(f"quarantined/{k}" for k in kept)
    for pool, volume_name, uid in volumes:
        vm = vms.get(uid)
        vm_key = (str(vm["metadata"]["namespace"]), str(vm["metadata"]["name"])) if vm else None
        reason = unwanted_volume(
            vm,
            agent.settings.node_name,
            shared_pool=pool in agent.settings.shared_pools,
            migrating=vm_key in migrating,
            domain_here=uid in domains_here,
            quarantine_pending=uid in pending,
        )
        if reason is None:
            continue
        with contextlib.suppress(hv_errors.NotFound):
            await storage.delete_volume(agent.hv, pool, volume_name)
        agent.log.warning("removed orphan volume", pool=pool, volume=volume_name, why=reason)
        removed.append(f"volume/{pool}/{volume_name}")
    return removed


async def _vms_for(agent: Agent, uids: set[str]) -> dict[str, dict[str, Any]]:
    """The VMs the sweep needs, by uid: this node's (a list the apiserver filters by the
    node label: O(this node), not O(fleet)), and every VM only when a domain or disk here
    belongs to none of them — after a migration away or a failover, not at steady state.
    A domain's VM is read again by name before anything is removed (the caller)."""
    node = agent.settings.node_name
    own = {
        str(vm["metadata"]["uid"]): vm
        for vm in await agent.kube.list("VirtualMachine", label_selector=f"{NODE_LABEL}={node}")
    }
    if uids <= own.keys():
        return own
    foreign = sorted(uids - own.keys())
    agent.log.info(
        "sweep lists every VM: domains or disks here belong to no VM of this node",
        count=len(foreign),
        uids=foreign[:5],
    )
    return {str(vm["metadata"]["uid"]): vm for vm in await agent.kube.list("VirtualMachine")}


def _forget_vanished(agent: Agent, cached: dict[Key, str], listed: Container[str]) -> None:
    """Forget VMs that were cached before a full listing began and are not in it.

    kopf lists again after a broken watch but reports nothing about the objects deleted
    meanwhile: such a VM stayed in the cache (resynced, counted in the VMHost) until
    the agent restarted. A VM cached before the list request cannot be missing from it
    unless it was deleted.
    """
    for key, uid in cached.items():
        body = agent.cache.get(key)
        if uid not in listed and body is not None and str(body["metadata"]["uid"]) == uid:
            agent.log.info(
                "forgetting a VM deleted while the watch was away",
                namespace=key[0],
                vm=key[1],
                uid=uid,
            )
            agent.forget(key)


#: VMMigration phases during which a domain may rightly sit on a node the VM is not on.
_UNFINISHED_MIGRATION = frozenset({MigrationPhase.SCHEDULED.value, MigrationPhase.RUNNING.value})


async def _unwanted(
    agent: Agent,
    guest: Guest,
    vm: dict[str, Any] | None,
    uid: str,
    migrating: set[tuple[str, str]],
) -> str | None:
    """:func:`unwanted_domain`, reading the domain's state only when it matters."""
    node = agent.settings.node_name
    first = unwanted_domain(vm, uid, node, domain_active=False, migrating=False)
    if first is None or vm is None or str(vm["metadata"].get("uid")) != uid:
        return first  # kept, or its VM is gone: the domain's state does not matter
    vm_key = (str(vm["metadata"].get("namespace")), str(vm["metadata"].get("name")))
    try:
        active = (await guest.status()).state.active
    except hv_errors.NotFound:
        return None
    return unwanted_domain(vm, uid, node, domain_active=active, migrating=vm_key in migrating)
