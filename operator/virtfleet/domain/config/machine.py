"""The machine in the XML object model: ``<cpu>`` and ``<os>``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from lxml import etree

from virtfleet.domain.config.base import (
    XmlConfig,
    add_child,
    expect_tag,
    parse_int,
    set_attribute,
    text_of,
)


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
        set_attribute(element, "mode", self.mode)
        set_attribute(element, "match", self.match)
        if self.model is not None:
            add_child(element, "model", self.model, fallback=self.fallback)
        if self.sockets is not None or self.cores is not None or self.threads is not None:
            add_child(
                element, "topology", sockets=self.sockets, cores=self.cores, threads=self.threads
            )
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        model = element.find("model")
        topology = element.find("topology")

        def topo(name: str) -> int | None:
            if topology is None:
                return None
            return parse_int(topology.get(name), f"<topology {name}>")

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
        set_attribute(element, "firmware", self.firmware)
        add_child(element, "type", self.type, arch=self.arch, machine=self.machine)
        if self.kernel is not None:
            add_child(element, "kernel", self.kernel)
        if self.initrd is not None:
            add_child(element, "initrd", self.initrd)
        if self.cmdline is not None:
            add_child(element, "cmdline", self.cmdline)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
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
            kernel=text_of(element.find("kernel")),
            initrd=text_of(element.find("initrd")),
            cmdline=text_of(element.find("cmdline")),
        )
