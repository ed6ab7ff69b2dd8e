"""An *example* placement of a VM on a node, for ``virtfleet render`` and tests.

Real agents resolve every path through libvirt (images are volumes in the image-store
pool, disks are volumes in configured pools; see :mod:`virtfleet.hypervisor.storage`).
This module only shows what a node with the default layout would produce, so that a
user can see the XML a manifest turns into without a cluster:

* disks: ``/var/lib/libvirt/virtfleet/<pool>/<domain>-<disk>.qcow2``, pool ``local``
  unless the disk names one (every source kind becomes a qcow2 volume: a blank disk, or
  an overlay on an image or a download);
* kernel and initrd: ``/var/lib/libvirt/virtfleet/images/<image>``;
* cloud-init seed: ``/var/lib/libvirt/virtfleet/local/<domain>-cidata.iso``;
* serial log: ``/var/log/libvirt/qemu/<domain>-serial.log``;
* bridge and network NICs: the agent's default nwfilter (``clean-traffic``).

Names come from the validated spec (``StoreName``: no ``/``, no ``..``), so even here a
name cannot leave its directory.
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Final

from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.domain.inputs import (
    DEFAULT_NWFILTER,
    AttachedNetwork,
    DiskBacking,
    DomainInputs,
    DomainType,
    NodeResources,
)
from virtfleet.domain.ownership import domain_name

__all__ = ["DEFAULT_POOL", "EXAMPLE_ROOT", "example_inputs", "example_node_resources"]

EXAMPLE_ROOT: Final = "/var/lib/libvirt/virtfleet"
DEFAULT_POOL: Final = "local"
IMAGE_STORE: Final = posixpath.join(EXAMPLE_ROOT, "images")
SERIAL_LOG_DIR: Final = "/var/log/libvirt/qemu"
EXAMPLE_NETWORK_BRIDGE: Final = "vfbr4096"
EXAMPLE_NETWORK_MTU: Final = 1450


def example_node_resources(spec: VirtualMachineSpec, *, namespace: str, name: str) -> NodeResources:
    """What a node with the default pools would resolve for ``spec`` (an illustration)."""
    domain = domain_name(namespace, name)
    disks = {
        disk.name: DiskBacking(
            path=posixpath.join(
                EXAMPLE_ROOT, disk.pool or DEFAULT_POOL, f"{domain}-{disk.name}.qcow2"
            ),
            format="qcow2",
        )
        for disk in spec.disks
    }
    kernel = spec.kernel
    return NodeResources(
        disks=disks,
        serial_log=posixpath.join(SERIAL_LOG_DIR, f"{domain}-serial.log"),
        kernel=posixpath.join(IMAGE_STORE, kernel.image) if kernel is not None else None,
        initrd=(
            posixpath.join(IMAGE_STORE, kernel.initrd)
            if kernel is not None and kernel.initrd is not None
            else None
        ),
        cloud_init_seed=(
            posixpath.join(EXAMPLE_ROOT, DEFAULT_POOL, f"{domain}-cidata.iso")
            if spec.cloud_init is not None
            else None
        ),
        # A VMNetwork's bridge as a node names it (its VNI, here the first assigned one).
        networks={
            nic.name: AttachedNetwork(bridge=EXAMPLE_NETWORK_BRIDGE, mtu=EXAMPLE_NETWORK_MTU)
            for nic in spec.interfaces
            if nic.type == InterfaceType.NETWORK
        },
    )


def example_inputs(
    spec: VirtualMachineSpec,
    *,
    namespace: str,
    name: str,
    uid: str | None = None,
    generation: int = 1,
    domain_type: DomainType = "qemu",
) -> DomainInputs:
    """Complete inputs for an example render.

    Without a cluster there is no ``metadata.uid``; the default is a UUIDv5 of the
    namespace and name, so rendering the same manifest twice gives the same XML.
    """
    if uid is None:
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://virtfleet.io/vm/{namespace}/{name}"))
    return DomainInputs(
        namespace=namespace,
        name=name,
        uid=uid,
        generation=generation,
        spec=spec,
        resources=example_node_resources(spec, namespace=namespace, name=name),
        domain_type=domain_type,
        nwfilter=DEFAULT_NWFILTER,
    )
