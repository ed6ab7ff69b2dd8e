"""Domain XML → :class:`ObservedDomain`: what a domain *is*, in the spec's vocabulary.

The reconciler compares this with the spec (through :func:`virtfleet.domain.diff`).
Feed it the **inactive** XML (``XMLDesc(VIR_DOMAIN_XML_INACTIVE)``) to check the
persistent definition: the live XML expands defaults (``host-model`` becomes a concrete
CPU, a missing CPU model becomes QEMU's default) that would read as drift. The live XML
is right for live-only facts (iotune actually in force).

Devices are matched to spec entries by their ``ua-`` alias (:mod:`virtfleet.domain.naming`),
never by order; a device without one has ``name=None`` and counts as foreign.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lxml import etree

from virtfleet.domain.config import (
    BandwidthConfig,
    DiskConfig,
    DomainConfig,
    InterfaceConfig,
    IoTuneConfig,
    parse_xml,
)
from virtfleet.domain.errors import MalformedDomainError
from virtfleet.domain.naming import (
    CLOUD_INIT_ALIAS,
    disk_name_from_alias,
    interface_name_from_alias,
)
from virtfleet.domain.ownership import OWNER_TAG, OwnerMetadata, find_owner

__all__ = ["ObservedDisk", "ObservedDomain", "ObservedInterface", "observe", "observe_config"]


@dataclass(frozen=True, kw_only=True)
class ObservedDisk:
    """A disk or cdrom; ``name`` is the spec disk name, ``None`` for a foreign device."""

    name: str | None
    target: str
    bus: str
    device: str
    kind: str
    path: str | None
    format: str | None
    readonly: bool
    boot_order: int | None
    #: Limits in force (zeros dropped); ``None`` when there are none.
    iotune: IoTuneConfig | None


@dataclass(frozen=True, kw_only=True)
class ObservedInterface:
    """A NIC; ``source`` is the bridge or network name; ``mac`` is lowercase."""

    name: str | None
    type: str
    source: str | None
    mac: str | None
    model: str | None
    bandwidth: BandwidthConfig | None
    #: The nwfilter libvirt applies to its traffic (``<filterref filter>``), if any.
    nwfilter: str | None = None


@dataclass(frozen=True, kw_only=True)
class ObservedDomain:
    """One domain as libvirt describes it.

    ``owner`` is the virtfleet marker, ``None`` when absent; when a marker is present but
    unreadable (another version, corrupted), ``owner`` is ``None`` and ``owner_error``
    says why — the reconciler must then leave the domain alone rather than adopt or
    delete it. ``cpu_model`` uses the spec's words: ``host-model``,
    ``host-passthrough``, ``maximum``, a model name, or ``None`` for the default.
    """

    uuid: str
    name: str
    virt_type: str
    owner: OwnerMetadata | None
    owner_error: str | None = None
    memory_bytes: int
    vcpus: int
    sockets: int
    cores: int
    threads: int
    cpu_model: str | None
    machine: str | None
    firmware: str  # bios | uefi
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    cloud_init_seed: str | None
    disks: tuple[ObservedDisk, ...]
    interfaces: tuple[ObservedInterface, ...]
    serial_path: str | None
    #: ``pty`` now; ``file`` in domains made before the console (no console there).
    serial_type: str | None = None
    #: Tags of devices virtfleet never creates (``hostdev``, ``graphics``, …).
    extra_devices: tuple[str, ...] = ()

    def disk(self, name: str) -> ObservedDisk | None:
        return next((d for d in self.disks if d.name == name), None)

    def interface(self, name: str) -> ObservedInterface | None:
        return next((i for i in self.interfaces if i.name == name), None)


def observe(document: str | bytes | etree._Element) -> ObservedDomain:
    """Read a domain XML (live or inactive); :class:`MalformedDomainError` if it is not one."""
    root = parse_xml(document) if isinstance(document, str | bytes) else document
    owner_error: str | None = None
    try:
        find_owner(root.find("metadata"))
    except MalformedDomainError as exc:
        owner_error = str(exc)
        root = copy.deepcopy(root)
        metadata = root.find("metadata")
        if metadata is not None:
            for marker in metadata.findall(OWNER_TAG):
                metadata.remove(marker)
    return _from_config(DomainConfig.parse(root), owner_error)


def observe_config(config: DomainConfig) -> ObservedDomain:
    """The observation a domain defined from ``config`` would give (for diffing a desire)."""
    return _from_config(config, None)


def _from_config(config: DomainConfig, owner_error: str | None) -> ObservedDomain:
    cpu = config.cpu
    sockets = cpu.sockets if cpu is not None and cpu.sockets else config.vcpus
    cores = cpu.cores if cpu is not None and cpu.cores else 1
    threads = cpu.threads if cpu is not None and cpu.threads else 1
    seed = next((d for d in config.disks if d.alias == CLOUD_INIT_ALIAS), None)
    serial = config.serial.path if config.serial is not None else None
    return ObservedDomain(
        uuid=config.uuid,
        name=config.name,
        virt_type=config.virt_type,
        owner=config.owner,
        owner_error=owner_error,
        memory_bytes=config.memory_kib * 1024,
        vcpus=config.vcpus,
        sockets=sockets,
        cores=cores,
        threads=threads,
        cpu_model=_cpu_model(config),
        machine=config.os.machine,
        firmware="uefi" if config.os.firmware == "efi" else "bios",
        kernel=config.os.kernel,
        initrd=config.os.initrd,
        cmdline=config.os.cmdline or None,
        cloud_init_seed=seed.path if seed is not None else None,
        disks=tuple(_disk(d) for d in config.disks if d is not seed),
        interfaces=tuple(_interface(i) for i in config.interfaces),
        serial_path=serial,
        serial_type=config.serial.kind if config.serial is not None else None,
        extra_devices=config.extra_devices,
    )


def _cpu_model(config: DomainConfig) -> str | None:
    cpu = config.cpu
    if cpu is None:
        return None
    if cpu.mode in ("host-model", "host-passthrough", "maximum"):
        return cpu.mode
    return cpu.model or None


def _disk(disk: DiskConfig) -> ObservedDisk:
    return ObservedDisk(
        name=disk_name_from_alias(disk.alias),
        target=disk.target_dev,
        bus=disk.target_bus,
        device=disk.device,
        kind=disk.kind,
        path=disk.path,
        format=disk.format,
        readonly=disk.readonly,
        boot_order=disk.boot_order,
        iotune=disk.iotune.in_force() if disk.iotune is not None else None,
    )


def _interface(nic: InterfaceConfig) -> ObservedInterface:
    return ObservedInterface(
        name=interface_name_from_alias(nic.alias),
        type=nic.type,
        source=nic.source,
        mac=nic.mac.lower() if nic.mac is not None else None,
        model=nic.model,
        bandwidth=_bandwidth(nic.bandwidth),
        nwfilter=nic.filterref,
    )


def _bandwidth(bandwidth: BandwidthConfig | None) -> BandwidthConfig | None:
    """An empty ``<bandwidth/>`` shapes nothing: the same as none."""
    if bandwidth is None or (bandwidth.inbound is None and bandwidth.outbound is None):
        return None
    return bandwidth
