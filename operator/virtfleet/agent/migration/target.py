"""The target side a source prepares: node-local volumes and the cloud-init seed there.

The source does it (over a connection to the target's libvirtd) because it already
resolved the VM's disks and holds the spec: no hand-shake between two agents, no extra
phase to recover, and the P2P migration needs that same link anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from virtfleet.agent.errors import ActionError
from virtfleet.agent.migration.context import MigrationContext
from virtfleet.agent.seed import build_iso, seed_files
from virtfleet.agent.volumes import seed_volume_name, volume_name
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.hypervisor import Hypervisor, VolumeRef, storage


@dataclass
class PreparedTarget:
    #: Source paths of the node-local disks the job copies, by disk name.
    copy_paths: dict[str, str] = field(default_factory=dict)
    #: Whether any disk is on a shared pool (the target opens the same file).
    shared: bool = False
    #: Bytes the job copies (the copied volumes' capacities).
    copied_bytes: int = 0


def data_uri(dest_uri: str) -> str | None:
    """``tcp://<host>`` of the target's libvirt URI: QEMU's stream goes to the same host."""
    rest = dest_uri.split("://", 1)[-1]
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return f"tcp://{host}" if host else None


def disk_targets(xml: str, paths: Mapping[str, str]) -> list[str]:
    """Target devs (``vda``) of the disks whose source file is one of ``paths``' values."""
    root = etree.fromstring(xml.encode())
    wanted = set(paths.values())
    out = []
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        target = disk.find("target")
        if source is not None and target is not None and source.get("file") in wanted:
            out.append(str(target.get("dev")))
    return out


async def prepare_target(
    ctx: MigrationContext,
    target: Hypervisor,
    vm_body: Mapping[str, Any],
    vm_spec: VirtualMachineSpec,
    uid: str,
) -> PreparedTarget:
    """Node-local volumes made on the target (same pool, same name, so the same path)."""
    prepared = PreparedTarget()
    settings = ctx.settings
    for disk in vm_spec.disks:
        pool = disk.pool or settings.default_pool
        name = volume_name(uid, disk.name)
        if pool in settings.shared_pools:
            prepared.shared = True
            continue
        source = await storage.lookup_volume(ctx.hv, pool, name)
        if source is None:
            raise ActionError(
                "VolumeMissing", f"disk {disk.name!r} has no volume on {ctx.node}", permanent=True
            )
        prepared.copy_paths[disk.name] = source.path
        prepared.copied_bytes += source.capacity
        if await storage.lookup_volume(target, pool, name) is not None:
            continue  # made by an earlier attempt: same name, same size
        if disk.source.image is not None:
            await storage.create_overlay(
                target,
                pool,
                name,
                VolumeRef(settings.image_pool, disk.source.image),
                source.capacity,
            )
        else:
            await storage.create_blank(target, pool, name, source.capacity)
    if vm_spec.cloud_init is not None:
        # Read-only seed: not copied by the migration, made again (same bytes) there.
        user_data = vm_spec.cloud_init.user_data
        ref = vm_spec.cloud_init.user_data_secret_ref
        if ref is not None:
            ns = str(vm_body["metadata"]["namespace"])
            user_data = (await ctx.kube.get_secret_key(ns, ref.name, ref.key)).decode()
        files = seed_files(
            uid=uid,
            hostname=str(vm_body["metadata"]["name"]),
            user_data=user_data,
            # The same bytes as the source's seed: the VMNetworks' addresses are the VM's.
            network_data=ctx.agent.networks.network_config(uid, vm_spec),
        )
        await storage.upload(target, settings.default_pool, seed_volume_name(uid), build_iso(files))
    return prepared


async def delete_target_volumes(
    ctx: MigrationContext, target: Hypervisor, vm_spec: VirtualMachineSpec, uid: str
) -> None:
    """Best effort: the node-local volumes an unfinished offline job made there."""
    names = [
        (disk.pool or ctx.settings.default_pool, volume_name(uid, disk.name))
        for disk in vm_spec.disks
        if (disk.pool or ctx.settings.default_pool) not in ctx.settings.shared_pools
    ]
    if vm_spec.cloud_init is not None:
        names.append((ctx.settings.default_pool, seed_volume_name(uid)))
    for pool, name in names:
        try:
            await storage.delete_volume(target, pool, name)
        except Exception as exc:  # best effort: the orphan sweep there removes what is left
            ctx.log.warning("cannot delete a volume on the target", volume=name, error=str(exc))
