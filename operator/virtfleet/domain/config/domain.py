"""The root of the XML object model: ``<domain>``, made of the element classes beside it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self

from lxml import etree

from virtfleet.domain.config.base import (
    XmlConfig,
    add_child,
    expect_tag,
    parse_int,
    parse_xml,
    required_attribute,
    set_attribute,
    text_of,
)
from virtfleet.domain.config.devices import (
    ConsoleConfig,
    GuestAgentChannelConfig,
    MemballoonConfig,
    RngConfig,
    SerialConfig,
)
from virtfleet.domain.config.disks import ControllerConfig, DiskConfig
from virtfleet.domain.config.machine import CpuConfig, OsConfig
from virtfleet.domain.config.network import InterfaceConfig
from virtfleet.domain.errors import MalformedDomainError
from virtfleet.domain.ownership import OwnerMetadata, find_owner

#: Units libvirt accepts on ``<memory>``, as multiples of one byte.
_MEMORY_UNITS: Final = {
    "b": 1,
    "bytes": 1,
    "KB": 10**3,
    "k": 2**10,
    "KiB": 2**10,
    "MB": 10**6,
    "M": 2**20,
    "MiB": 2**20,
    "GB": 10**9,
    "G": 2**30,
    "GiB": 2**30,
    "TB": 10**12,
    "T": 2**40,
    "TiB": 2**40,
}

#: Devices this model describes, plus those libvirt adds to every QEMU domain by itself
#: (so their presence is not drift).
_KNOWN_DEVICES: Final = frozenset(
    {"emulator", "disk", "controller", "interface", "serial", "console", "memballoon", "rng"}
)
_IMPLICIT_DEVICES: Final = frozenset({"input", "audio", "video", "watchdog", "channel"})


@dataclass(frozen=True, kw_only=True)
class DomainConfig(XmlConfig):
    """``<domain>``: everything virtfleet defines, in the order libvirt prints it."""

    tag: ClassVar[str] = "domain"

    virt_type: str  # qemu (TCG) or kvm
    name: str
    uuid: str
    owner: OwnerMetadata | None = None
    memory_kib: int
    current_memory_kib: int | None = None
    vcpus: int
    os: OsConfig = field(default_factory=OsConfig)
    features: tuple[str, ...] = ("acpi", "apic")
    cpu: CpuConfig | None = None
    clock_offset: str | None = "utc"
    on_poweroff: str | None = "destroy"
    on_reboot: str | None = "restart"
    on_crash: str | None = "destroy"
    emulator: str | None = None
    disks: tuple[DiskConfig, ...] = ()
    controllers: tuple[ControllerConfig, ...] = ()
    interfaces: tuple[InterfaceConfig, ...] = ()
    serial: SerialConfig | None = None
    console: ConsoleConfig | None = None
    memballoon: MemballoonConfig | None = None
    rng: RngConfig | None = None
    guest_agent: GuestAgentChannelConfig | None = None
    #: Tags of devices found by ``parse`` that this model does not describe (never rendered).
    extra_devices: tuple[str, ...] = ()

    def to_xml(self) -> etree._Element:
        domain = etree.Element(self.tag)
        set_attribute(domain, "type", self.virt_type)
        add_child(domain, "name", self.name)
        add_child(domain, "uuid", self.uuid)
        if self.owner is not None:
            add_child(domain, "metadata").append(self.owner.to_xml())
        add_child(domain, "memory", self.memory_kib, unit="KiB")
        if self.current_memory_kib is not None:
            add_child(domain, "currentMemory", self.current_memory_kib, unit="KiB")
        add_child(domain, "vcpu", self.vcpus, placement="static")
        domain.append(self.os.to_xml())
        if self.features:
            features = add_child(domain, "features")
            for feature in self.features:
                add_child(features, feature)
        if self.cpu is not None:
            domain.append(self.cpu.to_xml())
        if self.clock_offset is not None:
            add_child(domain, "clock", offset=self.clock_offset)
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            action = getattr(self, event)
            if action is not None:
                add_child(domain, event, action)
        devices = add_child(domain, "devices")
        if self.emulator is not None:
            add_child(devices, "emulator", self.emulator)
        children: Iterable[XmlConfig | None] = (
            *self.disks,
            *self.controllers,
            *self.interfaces,
            self.serial,
            self.console,
            self.memballoon,
            self.rng,
            self.guest_agent,
        )
        for child in children:
            if child is not None:
                devices.append(child.to_xml())
        return domain

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        name = text_of(element.find("name"))
        uuid = text_of(element.find("uuid"))
        if name is None or uuid is None:
            raise MalformedDomainError("<domain> without <name> or <uuid>")
        memory = element.find("memory")
        if memory is None:
            raise MalformedDomainError("<domain> without <memory>")
        current = element.find("currentMemory")
        vcpu = element.find("vcpu")
        os_element = element.find("os")
        cpu = element.find("cpu")
        features = element.find("features")
        clock = element.find("clock")
        devices = element.find("devices")
        if devices is None:
            devices = etree.Element("devices")
        memballoon = devices.find("memballoon")
        rng = devices.find("rng")
        serial = devices.find("serial")
        console = devices.find("console")
        agent = next(
            (c for c in devices.findall("channel") if GuestAgentChannelConfig.is_guest_agent(c)),
            None,
        )
        extra = tuple(
            child.tag
            for child in devices
            if isinstance(child.tag, str)
            and child.tag not in _KNOWN_DEVICES
            and child.tag not in _IMPLICIT_DEVICES
        )
        return cls(
            virt_type=required_attribute(element, "type"),
            name=name.strip(),
            uuid=uuid.strip().lower(),
            owner=find_owner(element.find("metadata")),
            memory_kib=_kib(memory),
            current_memory_kib=_kib(current) if current is not None else None,
            vcpus=(parse_int(text_of(vcpu), "<vcpu>") or 1) if vcpu is not None else 1,
            os=OsConfig.parse(os_element) if os_element is not None else OsConfig(),
            features=tuple(f.tag for f in features if isinstance(f.tag, str))
            if features is not None
            else (),
            cpu=CpuConfig.parse(cpu) if cpu is not None else None,
            clock_offset=clock.get("offset") if clock is not None else None,
            on_poweroff=text_of(element.find("on_poweroff")),
            on_reboot=text_of(element.find("on_reboot")),
            on_crash=text_of(element.find("on_crash")),
            emulator=text_of(devices.find("emulator")),
            disks=tuple(DiskConfig.parse(d) for d in devices.findall("disk")),
            controllers=tuple(ControllerConfig.parse(c) for c in devices.findall("controller")),
            interfaces=tuple(InterfaceConfig.parse(i) for i in devices.findall("interface")),
            serial=SerialConfig.parse(serial) if serial is not None else None,
            console=ConsoleConfig.parse(console) if console is not None else None,
            memballoon=MemballoonConfig.parse(memballoon) if memballoon is not None else None,
            rng=RngConfig.parse(rng) if rng is not None else None,
            guest_agent=GuestAgentChannelConfig.parse(agent) if agent is not None else None,
            extra_devices=extra,
        )

    @classmethod
    def from_string(cls, document: str | bytes) -> Self:
        return cls.parse(parse_xml(document))


def _kib(element: etree._Element) -> int:
    unit = element.get("unit", "KiB")
    factor = _MEMORY_UNITS.get(unit)
    if factor is None:
        raise MalformedDomainError(f"<{element.tag}> has an unknown unit {unit!r}")
    amount = parse_int(text_of(element), f"<{element.tag}>") or 0
    return -(-amount * factor // 1024)
