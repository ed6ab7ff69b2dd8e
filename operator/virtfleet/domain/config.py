"""An object model of the libvirt domain XML we write and read.

Each class maps one element (and the children that belong to it) to a frozen dataclass
with ``to_xml()`` and ``parse(element)``; ``parse(x.to_xml()) == x`` for every value the
builder produces. The XML is made by lxml, never by string templates: every user string
goes through :func:`xml_safe` and then into an attribute or text node that lxml escapes,
so quotes, ``<``, ``&`` or ``]]>`` stay data and cannot become markup. (The idea of one
class per element is OpenStack Nova's ``LibvirtConfigObject``; the code is our own.)

The model only covers what virtfleet renders or compares. ``parse`` ignores elements and
attributes it does not know (libvirt adds many: addresses, aliases of its own, PCI
controllers), except unknown *devices*, whose tags it records in
:attr:`DomainConfig.extra_devices` so that a device added behind our back shows up as
drift.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self

from lxml import etree

from virtfleet.domain.errors import MalformedDomainError, UnsafeValueError
from virtfleet.domain.ownership import OwnerMetadata, find_owner

__all__ = [
    "BandwidthConfig",
    "BandwidthLimit",
    "ConsoleConfig",
    "ControllerConfig",
    "CpuConfig",
    "DiskConfig",
    "DomainConfig",
    "InterfaceConfig",
    "IoTuneConfig",
    "MemballoonConfig",
    "OsConfig",
    "RngConfig",
    "SerialConfig",
    "XmlConfig",
    "parse_xml",
    "xml_safe",
]

#: Characters a domain XML cannot carry *unchanged through libvirt*: everything outside
#: XML 1.0's ``Char`` production (no escaping can carry NUL: ``&#0;`` is not well-formed),
#: and CR, which libvirt writes back unescaped so that every XML parser reads it as LF —
#: the stored value would then differ from the applied one forever (endless drift).
#: Refused, never dropped or rewritten silently.
_NOT_XML_CHAR = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

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


def xml_safe(value: str, what: str) -> str:
    """Return ``value`` if XML can carry it unchanged, else raise :class:`UnsafeValueError`."""
    bad = _NOT_XML_CHAR.search(value)
    if bad is not None:
        raise UnsafeValueError(
            f"{what} contains the character {bad.group()!r} at offset {bad.start()}, "
            "which a libvirt domain XML cannot carry unchanged"
        )
    return value


_PARSER: Final = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True
)


def parse_xml(document: str | bytes) -> etree._Element:
    """Parse a domain XML (e.g. from ``XMLDesc``) without entities, DTDs or network access."""
    data = document.encode() if isinstance(document, str) else document
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise MalformedDomainError(f"not well-formed XML: {exc}") from exc
    if getattr(root.getroottree().docinfo, "doctype", ""):
        raise MalformedDomainError("a domain XML with a DOCTYPE is refused")
    return root


# --- small helpers: every string written goes through _set/_text ----------------------


def _set(element: etree._Element, attribute: str, value: str | int | None) -> None:
    if value is None:
        return
    text = str(value)
    element.set(attribute, xml_safe(text, f"<{element.tag} {attribute}>"))


def _sub(
    parent: etree._Element,
    tag: str,
    text: str | int | None = None,
    **attributes: str | int | None,
) -> etree._Element:
    child = etree.SubElement(parent, tag)
    for name, value in attributes.items():
        _set(child, name, value)
    if text is not None:
        child.text = xml_safe(str(text), f"<{tag}> text")
    return child


def _int(raw: str | None, where: str) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError as exc:
        raise MalformedDomainError(f"{where}: {raw!r} is not an integer") from exc


def _required(element: etree._Element, attribute: str) -> str:
    value = element.get(attribute)
    if value is None:
        raise MalformedDomainError(f"<{element.tag}> lacks the {attribute!r} attribute")
    return value


def _text_of(element: etree._Element | None) -> str | None:
    if element is None:
        return None
    return element.text or ""


def _expect(element: etree._Element, tag: str) -> None:
    if element.tag != tag:
        raise MalformedDomainError(f"expected <{tag}>, found <{element.tag}>")


class XmlConfig(ABC):
    """One XML element as a value: build it with ``to_xml``, read it back with ``parse``."""

    tag: ClassVar[str]

    @abstractmethod
    def to_xml(self) -> etree._Element:
        """A fresh element tree (the caller may attach it anywhere)."""

    @classmethod
    @abstractmethod
    def parse(cls, element: etree._Element) -> Self:
        """Read an element; raises :class:`MalformedDomainError` on a shape we cannot use."""

    def to_string(self) -> str:
        return etree.tostring(self.to_xml(), encoding="unicode", pretty_print=True)


# --- disks ---------------------------------------------------------------------------


_IOTUNE_FIELDS: Final = (
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
)


@dataclass(frozen=True, kw_only=True)
class IoTuneConfig(XmlConfig):
    """``<iotune>``: byte and IOPS limits of one disk; libvirt reads ``0`` as "no limit"."""

    tag: ClassVar[str] = "iotune"

    total_bytes_sec: int | None = None
    read_bytes_sec: int | None = None
    write_bytes_sec: int | None = None
    total_iops_sec: int | None = None
    read_iops_sec: int | None = None
    write_iops_sec: int | None = None

    def limits(self) -> dict[str, int]:
        """The limits in force: set and non-zero (what ``blkdeviotune`` would apply)."""
        values = {name: getattr(self, name) for name in _IOTUNE_FIELDS}
        return {name: value for name, value in values.items() if value}

    def in_force(self) -> IoTuneConfig | None:
        """The same limits without unset or zero entries; ``None`` when nothing is limited."""
        limits = self.limits()
        return IoTuneConfig(**limits) if limits else None

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        for name in _IOTUNE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                _sub(element, name, int(value))
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        values: dict[str, int | None] = {}
        for name in _IOTUNE_FIELDS:
            values[name] = _int(_text_of(element.find(name)), f"<iotune><{name}>")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class DiskConfig(XmlConfig):
    """``<disk>``: a file or block device, attached as a disk or a cdrom."""

    tag: ClassVar[str] = "disk"

    kind: str = "file"  # file | block (others parse with path None)
    device: str = "disk"  # disk | cdrom
    format: str | None = None  # <driver type>
    cache: str | None = None
    discard: str | None = None
    path: str | None = None
    target_dev: str
    target_bus: str
    readonly: bool = False
    boot_order: int | None = None
    iotune: IoTuneConfig | None = None
    alias: str | None = None

    _SOURCE_ATTRIBUTE: ClassVar[dict[str, str]] = {"file": "file", "block": "dev"}

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "type", self.kind)
        _set(element, "device", self.device)
        if self.format is not None or self.cache is not None or self.discard is not None:
            _sub(
                element,
                "driver",
                name="qemu",
                type=self.format,
                cache=self.cache,
                discard=self.discard,
            )
        if self.path is not None:
            attribute = self._SOURCE_ATTRIBUTE.get(self.kind)
            if attribute is None:
                raise UnsafeValueError(f"disk type {self.kind!r} cannot carry a source path")
            _sub(element, "source", **{attribute: self.path})
        _sub(element, "target", dev=self.target_dev, bus=self.target_bus)
        if self.iotune is not None:
            element.append(self.iotune.to_xml())
        if self.readonly:
            _sub(element, "readonly")
        if self.boot_order is not None:
            _sub(element, "boot", order=self.boot_order)
        if self.alias is not None:
            _sub(element, "alias", name=self.alias)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        kind = element.get("type", "file")
        driver = element.find("driver")
        source = element.find("source")
        target = element.find("target")
        if target is None:
            raise MalformedDomainError("<disk> without <target>")
        attribute = cls._SOURCE_ATTRIBUTE.get(kind)
        path = source.get(attribute) if source is not None and attribute else None
        iotune = element.find("iotune")
        boot = element.find("boot")
        alias = element.find("alias")
        return cls(
            kind=kind,
            device=element.get("device", "disk"),
            format=driver.get("type") if driver is not None else None,
            cache=driver.get("cache") if driver is not None else None,
            discard=driver.get("discard") if driver is not None else None,
            path=path,
            target_dev=_required(target, "dev"),
            target_bus=target.get("bus", ""),
            readonly=element.find("readonly") is not None,
            boot_order=_int(boot.get("order"), "<boot order>") if boot is not None else None,
            iotune=IoTuneConfig.parse(iotune) if iotune is not None else None,
            alias=alias.get("name") if alias is not None else None,
        )


@dataclass(frozen=True, kw_only=True)
class ControllerConfig(XmlConfig):
    """``<controller>``; virtfleet only writes the virtio-scsi one that SCSI disks need."""

    tag: ClassVar[str] = "controller"

    type: str
    index: int = 0
    model: str | None = None

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "type", self.type)
        _set(element, "index", self.index)
        _set(element, "model", self.model)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        return cls(
            type=_required(element, "type"),
            index=_int(element.get("index"), "<controller index>") or 0,
            model=element.get("model"),
        )


# --- network -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BandwidthLimit:
    """One direction of ``<bandwidth>`` (kilobytes per second, burst in kilobytes)."""

    average: int
    peak: int | None = None
    burst: int | None = None

    def to_xml(self, direction: str) -> etree._Element:
        element = etree.Element(direction)
        _set(element, "average", self.average)
        _set(element, "peak", self.peak)
        _set(element, "burst", self.burst)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        average = _int(element.get("average"), f"<{element.tag} average>")
        return cls(
            average=average or 0,
            peak=_int(element.get("peak"), f"<{element.tag} peak>"),
            burst=_int(element.get("burst"), f"<{element.tag} burst>"),
        )


@dataclass(frozen=True, kw_only=True)
class BandwidthConfig(XmlConfig):
    """``<bandwidth>`` of an interface; ``inbound`` is traffic towards the guest."""

    tag: ClassVar[str] = "bandwidth"

    inbound: BandwidthLimit | None = None
    outbound: BandwidthLimit | None = None

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        if self.inbound is not None:
            element.append(self.inbound.to_xml("inbound"))
        if self.outbound is not None:
            element.append(self.outbound.to_xml("outbound"))
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        inbound = element.find("inbound")
        outbound = element.find("outbound")
        return cls(
            inbound=BandwidthLimit.parse(inbound) if inbound is not None else None,
            outbound=BandwidthLimit.parse(outbound) if outbound is not None else None,
        )


@dataclass(frozen=True, kw_only=True)
class InterfaceConfig(XmlConfig):
    """``<interface>`` of type user, bridge or network; ``filterref`` names an nwfilter."""

    tag: ClassVar[str] = "interface"

    type: str
    source: str | None = None  # bridge or network name
    mac: str | None = None
    model: str | None = None
    bandwidth: BandwidthConfig | None = None
    filterref: str | None = None
    alias: str | None = None

    _SOURCE_ATTRIBUTE: ClassVar[dict[str, str]] = {"bridge": "bridge", "network": "network"}

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "type", self.type)
        if self.mac is not None:
            _sub(element, "mac", address=self.mac)
        if self.source is not None:
            attribute = self._SOURCE_ATTRIBUTE.get(self.type)
            if attribute is None:
                raise UnsafeValueError(f"interface type {self.type!r} has no source")
            _sub(element, "source", **{attribute: self.source})
        if self.bandwidth is not None:
            element.append(self.bandwidth.to_xml())
        if self.model is not None:
            _sub(element, "model", type=self.model)
        if self.filterref is not None:
            _sub(element, "filterref", filter=self.filterref)
        if self.alias is not None:
            _sub(element, "alias", name=self.alias)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        kind = _required(element, "type")
        mac = element.find("mac")
        source = element.find("source")
        attribute = cls._SOURCE_ATTRIBUTE.get(kind)
        model = element.find("model")
        bandwidth = element.find("bandwidth")
        filterref = element.find("filterref")
        alias = element.find("alias")
        return cls(
            type=kind,
            source=source.get(attribute) if source is not None and attribute else None,
            mac=mac.get("address") if mac is not None else None,
            model=model.get("type") if model is not None else None,
            bandwidth=BandwidthConfig.parse(bandwidth) if bandwidth is not None else None,
            filterref=filterref.get("filter") if filterref is not None else None,
            alias=alias.get("name") if alias is not None else None,
        )


# --- character devices -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SerialConfig(XmlConfig):
    """``<serial type='file'>``: the guest's first serial port, written to a host file.

    ``append`` keeps the log across restarts instead of truncating it at every start.
    Other serial types parse with ``path=None``.
    """

    tag: ClassVar[str] = "serial"

    path: str | None
    append: bool = True
    port: int = 0

    def _target(self, element: etree._Element) -> None:
        _sub(element, "target", port=self.port)

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "type", "file")
        _sub(element, "source", path=self.path, append="on" if self.append else None)
        self._target(element)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        source = element.find("source")
        target = element.find("target")
        is_file = element.get("type") == "file" and source is not None
        return cls(
            path=source.get("path") if is_file and source is not None else None,
            append=source is not None and source.get("append") == "on",
            port=(_int(target.get("port"), "<target port>") or 0) if target is not None else 0,
        )


@dataclass(frozen=True, kw_only=True)
class ConsoleConfig(SerialConfig):
    """``<console>`` bound to serial port 0, so ``virsh console`` and kernels find it."""

    tag: ClassVar[str] = "console"

    def _target(self, element: etree._Element) -> None:
        _sub(element, "target", type="serial", port=self.port)


@dataclass(frozen=True, kw_only=True)
class MemballoonConfig(XmlConfig):
    tag: ClassVar[str] = "memballoon"

    model: str = "virtio"

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "model", self.model)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        return cls(model=_required(element, "model"))


@dataclass(frozen=True, kw_only=True)
class RngConfig(XmlConfig):
    """``<rng>``: a virtio entropy source, so early boot (cloud-init, sshd keys) never waits."""

    tag: ClassVar[str] = "rng"

    model: str = "virtio"
    backend: str = "/dev/urandom"

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "model", self.model)
        _sub(element, "backend", self.backend, model="random")
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        backend = element.find("backend")
        return cls(
            model=_required(element, "model"),
            backend=(backend.text or "") if backend is not None else "",
        )


# --- cpu and os ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CpuConfig(XmlConfig):
    """``<cpu>``: mode (host-model, host-passthrough, custom or unset) and topology."""

    tag: ClassVar[str] = "cpu"

    mode: str | None = None
    model: str | None = None
    match: str | None = None
    fallback: str | None = None
    sockets: int | None = None
    cores: int | None = None
    threads: int | None = None

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "mode", self.mode)
        _set(element, "match", self.match)
        if self.model is not None:
            _sub(element, "model", self.model, fallback=self.fallback)
        if self.sockets is not None or self.cores is not None or self.threads is not None:
            _sub(element, "topology", sockets=self.sockets, cores=self.cores, threads=self.threads)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        model = element.find("model")
        topology = element.find("topology")

        def topo(name: str) -> int | None:
            if topology is None:
                return None
            return _int(topology.get(name), f"<topology {name}>")

        return cls(
            mode=element.get("mode"),
            model=(model.text or "").strip() if model is not None else None,
            match=element.get("match"),
            fallback=model.get("fallback") if model is not None else None,
            sockets=topo("sockets"),
            cores=topo("cores"),
            threads=topo("threads"),
        )


@dataclass(frozen=True, kw_only=True)
class OsConfig(XmlConfig):
    """``<os>``: machine, firmware and direct kernel boot.

    Boot order is per device (``<boot order>`` on each disk) rather than ``<os><boot
    dev>``: it names a disk, and libvirt refuses to mix the two styles.
    ``firmware='efi'`` lets libvirt pick the OVMF build and NVRAM itself; ``parse`` also
    reads an expanded ``<loader type='pflash'>`` as EFI.
    """

    tag: ClassVar[str] = "os"

    type: str = "hvm"
    arch: str | None = None
    machine: str | None = None
    firmware: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        _set(element, "firmware", self.firmware)
        _sub(element, "type", self.type, arch=self.arch, machine=self.machine)
        if self.kernel is not None:
            _sub(element, "kernel", self.kernel)
        if self.initrd is not None:
            _sub(element, "initrd", self.initrd)
        if self.cmdline is not None:
            _sub(element, "cmdline", self.cmdline)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        os_type = element.find("type")
        loader = element.find("loader")
        firmware = element.get("firmware")
        if firmware is None and loader is not None and loader.get("type") == "pflash":
            firmware = "efi"
        return cls(
            type=(os_type.text or "").strip() if os_type is not None else "hvm",
            arch=os_type.get("arch") if os_type is not None else None,
            machine=os_type.get("machine") if os_type is not None else None,
            firmware=firmware,
            kernel=_text_of(element.find("kernel")),
            initrd=_text_of(element.find("initrd")),
            cmdline=_text_of(element.find("cmdline")),
        )


# --- the domain ------------------------------------------------------------------------


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
    #: Tags of devices found by ``parse`` that this model does not describe (never rendered).
    extra_devices: tuple[str, ...] = ()

    def to_xml(self) -> etree._Element:
        domain = etree.Element(self.tag)
        _set(domain, "type", self.virt_type)
        _sub(domain, "name", self.name)
        _sub(domain, "uuid", self.uuid)
        if self.owner is not None:
            _sub(domain, "metadata").append(self.owner.to_xml())
        _sub(domain, "memory", self.memory_kib, unit="KiB")
        if self.current_memory_kib is not None:
            _sub(domain, "currentMemory", self.current_memory_kib, unit="KiB")
        _sub(domain, "vcpu", self.vcpus, placement="static")
        domain.append(self.os.to_xml())
        if self.features:
            features = _sub(domain, "features")
            for feature in self.features:
                _sub(features, feature)
        if self.cpu is not None:
            domain.append(self.cpu.to_xml())
        if self.clock_offset is not None:
            _sub(domain, "clock", offset=self.clock_offset)
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            action = getattr(self, event)
            if action is not None:
                _sub(domain, event, action)
        devices = _sub(domain, "devices")
        if self.emulator is not None:
            _sub(devices, "emulator", self.emulator)
        children: Iterable[XmlConfig | None] = (
            *self.disks,
            *self.controllers,
            *self.interfaces,
            self.serial,
            self.console,
            self.memballoon,
            self.rng,
        )
        for child in children:
            if child is not None:
                devices.append(child.to_xml())
        return domain

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        _expect(element, cls.tag)
        name = _text_of(element.find("name"))
        uuid = _text_of(element.find("uuid"))
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
        extra = tuple(
            child.tag
            for child in devices
            if isinstance(child.tag, str)
            and child.tag not in _KNOWN_DEVICES
            and child.tag not in _IMPLICIT_DEVICES
        )
        return cls(
            virt_type=_required(element, "type"),
            name=name.strip(),
            uuid=uuid.strip().lower(),
            owner=find_owner(element.find("metadata")),
            memory_kib=_kib(memory),
            current_memory_kib=_kib(current) if current is not None else None,
            vcpus=(_int(_text_of(vcpu), "<vcpu>") or 1) if vcpu is not None else 1,
            os=OsConfig.parse(os_element) if os_element is not None else OsConfig(),
            features=tuple(f.tag for f in features if isinstance(f.tag, str))
            if features is not None
            else (),
            cpu=CpuConfig.parse(cpu) if cpu is not None else None,
            clock_offset=clock.get("offset") if clock is not None else None,
            on_poweroff=_text_of(element.find("on_poweroff")),
            on_reboot=_text_of(element.find("on_reboot")),
            on_crash=_text_of(element.find("on_crash")),
            emulator=_text_of(devices.find("emulator")),
            disks=tuple(DiskConfig.parse(d) for d in devices.findall("disk")),
            controllers=tuple(ControllerConfig.parse(c) for c in devices.findall("controller")),
            interfaces=tuple(InterfaceConfig.parse(i) for i in devices.findall("interface")),
            serial=SerialConfig.parse(serial) if serial is not None else None,
            console=ConsoleConfig.parse(console) if console is not None else None,
            memballoon=MemballoonConfig.parse(memballoon) if memballoon is not None else None,
            rng=RngConfig.parse(rng) if rng is not None else None,
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
    amount = _int(_text_of(element), f"<{element.tag}>") or 0
    return -(-amount * factor // 1024)
