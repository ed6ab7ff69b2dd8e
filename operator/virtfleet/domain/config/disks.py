"""Disks of the XML object model: ``<disk>`` with its ``<iotune>``, and ``<controller>``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Self

from lxml import etree

from virtfleet.domain.config.base import (
    XmlConfig,
    add_child,
    expect_tag,
    parse_int,
    required_attribute,
    set_attribute,
    text_of,
)
from virtfleet.domain.errors import MalformedDomainError, UnsafeValueError

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
                add_child(element, name, int(value))
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        values: dict[str, int | None] = {}
        for name in _IOTUNE_FIELDS:
            values[name] = parse_int(text_of(element.find(name)), f"<iotune><{name}>")
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
        set_attribute(element, "type", self.kind)
        set_attribute(element, "device", self.device)
        if self.format is not None or self.cache is not None or self.discard is not None:
            add_child(
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
            add_child(element, "source", **{attribute: self.path})
        add_child(element, "target", dev=self.target_dev, bus=self.target_bus)
        if self.iotune is not None:
            element.append(self.iotune.to_xml())
        if self.readonly:
            add_child(element, "readonly")
        if self.boot_order is not None:
            add_child(element, "boot", order=self.boot_order)
        if self.alias is not None:
            add_child(element, "alias", name=self.alias)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
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
            target_dev=required_attribute(target, "dev"),
            target_bus=target.get("bus", ""),
            readonly=element.find("readonly") is not None,
            boot_order=parse_int(boot.get("order"), "<boot order>") if boot is not None else None,
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
        set_attribute(element, "type", self.type)
        set_attribute(element, "index", self.index)
        set_attribute(element, "model", self.model)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        return cls(
            type=required_attribute(element, "type"),
            index=parse_int(element.get("index"), "<controller index>") or 0,
            model=element.get("model"),
        )
