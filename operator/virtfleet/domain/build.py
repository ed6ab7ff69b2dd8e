"""Spec + resolved node resources → :class:`DomainConfig` (and its XML).

A pure function of :class:`DomainInputs`: the same inputs give byte-identical XML, so the
agent can redefine idempotently and tests can pin the output. Choices that are not in
the spec are fixed here, each for a reason:

* disks use ``cache`` from their :class:`DiskBacking` (default ``none``: safe for live
  migration and for the guest's flushes) and ``discard='unmap'`` so thin qcow2 images
  shrink when the guest trims;
* ``<features><acpi/><apic/>``: without ACPI, ``virDomainShutdown`` (the graceful half
  of ``terminationGracePeriodSeconds``) does nothing;
* no graphics; the serial console goes to a file and ``<console>`` points at it;
* a virtio RNG, so an entropy-starved guest does not stall early boot (slow under TCG);
* ``on_poweroff/on_crash=destroy`` and ``on_reboot=restart``: the run strategy, not
  libvirt, decides what happens after a guest stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from lxml import etree

from virtfleet.api.virtualmachine import (
    Bandwidth,
    Cpu,
    Disk,
    DiskBus,
    FirmwareType,
    Interface,
    InterfaceType,
    IoTune,
)
from virtfleet.domain.config import (
    BandwidthConfig,
    BandwidthLimit,
    ConsoleConfig,
    ControllerConfig,
    CpuConfig,
    DiskConfig,
    DomainConfig,
    GuestAgentChannelConfig,
    InterfaceConfig,
    IoTuneConfig,
    MemballoonConfig,
    OsConfig,
    RngConfig,
    SerialConfig,
    xml_safe,
)
from virtfleet.domain.errors import InvalidInputError
from virtfleet.domain.inputs import DomainInputs
from virtfleet.domain.naming import CLOUD_INIT_ALIAS, disk_alias, interface_alias, target_dev

__all__ = ["CPU_MODES", "build_domain", "render_xml"]

#: ``spec.cpu.model`` values that are libvirt CPU *modes*; anything else is a named model.
CPU_MODES: Final = frozenset({"host-model", "host-passthrough", "maximum"})

#: Guest device-name prefix per bus. SATA and SCSI share ``sd``: in libvirt they are one
#: namespace, so they are numbered together. The seed disk continues the ``vd`` names.
_PREFIX: Final = {DiskBus.VIRTIO: "vd", DiskBus.SATA: "sd", DiskBus.SCSI: "sd"}


def build_domain(inputs: DomainInputs) -> DomainConfig:
    """The domain virtfleet wants for these inputs; :class:`InvalidInputError` if impossible."""
    spec = inputs.spec
    resources = inputs.resources
    memory_kib = spec.memory.size.mebibytes * 1024  # QEMU rounds to whole MiB anyway
    disks = tuple(_disks(inputs))
    controllers: tuple[ControllerConfig, ...] = ()
    if any(disk.bus == DiskBus.SCSI for disk in spec.disks):
        controllers = (ControllerConfig(type="scsi", index=0, model="virtio-scsi"),)
    return DomainConfig(
        virt_type=inputs.domain_type,
        name=inputs.domain_name,
        uuid=inputs.uid,
        owner=inputs.owner,
        memory_kib=memory_kib,
        current_memory_kib=memory_kib,
        vcpus=spec.cpu.vcpus,
        os=_os(inputs),
        cpu=_cpu(spec.cpu, inputs.domain_type),
        emulator=resources.emulator,
        disks=disks,
        controllers=controllers,
        interfaces=tuple(_interface(inputs, nic) for nic in spec.interfaces),
        serial=SerialConfig(path=resources.serial_log),
        console=ConsoleConfig(path=resources.serial_log),
        memballoon=MemballoonConfig(model="virtio"),
        rng=RngConfig(),
        guest_agent=GuestAgentChannelConfig(),
    )


def render_xml(inputs: DomainInputs) -> str:
    """The domain XML, ready for ``defineXMLFlags(xml, VIR_DOMAIN_DEFINE_VALIDATE)``."""
    element = build_domain(inputs).to_xml()
    return etree.tostring(element, encoding="unicode", pretty_print=True)


def _os(inputs: DomainInputs) -> OsConfig:
    spec = inputs.spec
    cmdline = spec.kernel.cmdline if spec.kernel is not None else None
    if cmdline is not None:
        xml_safe(cmdline, "spec.kernel.cmdline")
    return OsConfig(
        arch=inputs.arch,
        machine=spec.machine,
        firmware="efi" if spec.firmware.type == FirmwareType.UEFI else None,
        kernel=inputs.resources.kernel,
        initrd=inputs.resources.initrd,
        cmdline=cmdline or None,  # an empty command line is no command line
    )


def _cpu(cpu: Cpu, domain_type: str) -> CpuConfig:
    if cpu.model is None:
        return CpuConfig(sockets=cpu.sockets, cores=cpu.cores, threads=cpu.threads)
    if cpu.model == "host-passthrough" and domain_type != "kvm":
        raise InvalidInputError(
            "spec.cpu.model host-passthrough needs hardware virtualisation (KVM); this node "
            f"runs {domain_type!r} (TCG) domains: use host-model, maximum or a named model"
        )
    if cpu.model in CPU_MODES:
        return CpuConfig(mode=cpu.model, sockets=cpu.sockets, cores=cpu.cores, threads=cpu.threads)
    # A named model must be exactly that model: no silent fallback to another one.
    return CpuConfig(
        mode="custom",
        match="exact",
        model=cpu.model,
        fallback="forbid",
        sockets=cpu.sockets,
        cores=cpu.cores,
        threads=cpu.threads,
    )


def _disks(inputs: DomainInputs) -> Iterator[DiskConfig]:
    counters = {"vd": 0, "sd": 0}

    def next_target(prefix: str) -> str:
        index = counters[prefix]
        counters[prefix] = index + 1
        return target_dev(prefix, index)

    for disk in inputs.spec.disks:
        backing = inputs.resources.disks[disk.name]
        _check_disk(disk)
        yield DiskConfig(
            kind=backing.kind,
            device="disk",
            format=backing.format,
            cache=backing.cache,
            discard="unmap",
            path=backing.path,
            target_dev=next_target(_PREFIX[disk.bus]),
            target_bus=disk.bus.value,
            readonly=disk.read_only,
            boot_order=disk.boot_order,
            iotune=_iotune(disk.iotune),
            alias=disk_alias(disk.name),
        )
    seed = inputs.resources.cloud_init_seed
    if seed is not None:
        # A read-only virtio disk, as KubeVirt's cloudInitNoCloud: cloud-init finds it by
        # its label on any block device, and cloud kernels (Debian's) have virtio but
        # no AHCI, so a SATA cdrom would be invisible to them.
        yield DiskConfig(
            kind="file",
            device="disk",
            format="raw",
            path=seed,
            target_dev=next_target("vd"),
            target_bus="virtio",
            readonly=True,
            alias=CLOUD_INIT_ALIAS,
        )


def _check_disk(disk: Disk) -> None:
    if disk.read_only and disk.bus == DiskBus.SATA:
        # QEMU's ide-hd refuses read-only drives ("Can't use a read-only drive").
        raise InvalidInputError(
            f"disk {disk.name!r}: a read-only disk cannot use bus sata (QEMU refuses "
            "read-only SATA hard disks); use virtio or scsi"
        )


def _iotune(iotune: IoTune | None) -> IoTuneConfig | None:
    """Limits in force only: ``0`` means "unlimited" to libvirt, which then omits it."""
    if iotune is None:
        return None
    config = IoTuneConfig(
        total_bytes_sec=iotune.total_bytes_sec or None,
        read_bytes_sec=iotune.read_bytes_sec or None,
        write_bytes_sec=iotune.write_bytes_sec or None,
        total_iops_sec=iotune.total_iops_sec or None,
        read_iops_sec=iotune.read_iops_sec or None,
        write_iops_sec=iotune.write_iops_sec or None,
    )
    return config.in_force()


def _interface(inputs: DomainInputs, nic: Interface) -> InterfaceConfig:
    kind, source, mtu, address = nic.type.value, nic.bridge, None, None
    if nic.type == InterfaceType.NETWORK:
        # A VMNetwork is a bridge on every node that has a VM on it (its VXLAN joins them).
        attached = inputs.resources.networks[nic.name]
        kind, source, mtu = InterfaceType.BRIDGE.value, attached.bridge, attached.mtu
        address = attached.address
    filterref = inputs.nwfilter if nic.type != InterfaceType.USER else None
    return InterfaceConfig(
        type=kind,
        source=source,
        mtu=mtu,
        mac=nic.mac_for(inputs.uid),
        model=nic.model.value,
        bandwidth=_bandwidth(nic),
        # Bridge and network NICs share a segment with other hosts: libvirt filters what
        # the guest may send (its own MAC and IP). A user NIC has no tap to filter.
        filterref=filterref,
        filter_ip=address if filterref is not None else None,
        alias=interface_alias(nic.name),
    )


def _bandwidth(nic: Interface) -> BandwidthConfig | None:
    if nic.bandwidth is None or (nic.bandwidth.inbound is None and nic.bandwidth.outbound is None):
        return None

    def limit(direction: Bandwidth | None) -> BandwidthLimit | None:
        if direction is None:
            return None
        return BandwidthLimit(
            average=direction.average_kbps, peak=direction.peak_kbps, burst=direction.burst_kb
        )

    return BandwidthConfig(
        inbound=limit(nic.bandwidth.inbound), outbound=limit(nic.bandwidth.outbound)
    )
