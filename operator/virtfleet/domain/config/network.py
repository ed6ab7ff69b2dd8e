"""Network of the XML object model: ``<interface>`` and its ``<bandwidth>``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from lxml import etree

from virtfleet.domain.config.base import (
    XmlConfig,
    add_child,
    expect_tag,
    parse_int,
    required_attribute,
    set_attribute,
)
from virtfleet.domain.errors import UnsafeValueError


@dataclass(frozen=True, kw_only=True)
class BandwidthLimit:
    """One direction of ``<bandwidth>`` (kilobytes per second, burst in kilobytes)."""

    average: int
    peak: int | None = None
    burst: int | None = None

    def to_xml(self, direction: str) -> etree._Element:
        element = etree.Element(direction)
        set_attribute(element, "average", self.average)
        set_attribute(element, "peak", self.peak)
        set_attribute(element, "burst", self.burst)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        average = parse_int(element.get("average"), f"<{element.tag} average>")
        return cls(
            average=average or 0,
            peak=parse_int(element.get("peak"), f"<{element.tag} peak>"),
            burst=parse_int(element.get("burst"), f"<{element.tag} burst>"),
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
        expect_tag(element, cls.tag)
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
    #: ``<mtu size>``: a VMNetwork's (its VXLAN leaves less than the underlay's 1500).
    mtu: int | None = None
    #: The filter's ``IP`` parameter: the one address the guest may send from (a
    #: VMNetwork's IPAM address); None lets libvirt learn the first one used.
    filter_ip: str | None = None

    _SOURCE_ATTRIBUTE: ClassVar[dict[str, str]] = {"bridge": "bridge", "network": "network"}

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        set_attribute(element, "type", self.type)
        if self.mac is not None:
            add_child(element, "mac", address=self.mac)
        if self.source is not None:
            attribute = self._SOURCE_ATTRIBUTE.get(self.type)
            if attribute is None:
                raise UnsafeValueError(f"interface type {self.type!r} has no source")
            add_child(element, "source", **{attribute: self.source})
        if self.bandwidth is not None:
            element.append(self.bandwidth.to_xml())
        if self.model is not None:
            add_child(element, "model", type=self.model)
        if self.filterref is not None:
            ref = add_child(element, "filterref", filter=self.filterref)
            if self.filter_ip is not None:
                add_child(ref, "parameter", name="IP", value=self.filter_ip)
        if self.alias is not None:
            add_child(element, "alias", name=self.alias)
        if self.mtu is not None:
            add_child(element, "mtu", size=str(self.mtu))
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        kind = required_attribute(element, "type")
        mac = element.find("mac")
        source = element.find("source")
        attribute = cls._SOURCE_ATTRIBUTE.get(kind)
        model = element.find("model")
        bandwidth = element.find("bandwidth")
        filterref = element.find("filterref")
        alias = element.find("alias")
        mtu = element.find("mtu")
        pinned = element.find("filterref/parameter[@name='IP']")
        return cls(
            type=kind,
            source=source.get(attribute) if source is not None and attribute else None,
            mac=mac.get("address") if mac is not None else None,
            model=model.get("type") if model is not None else None,
            bandwidth=BandwidthConfig.parse(bandwidth) if bandwidth is not None else None,
            filterref=filterref.get("filter") if filterref is not None else None,
            alias=alias.get("name") if alias is not None else None,
            mtu=int(mtu.get("size", "0")) or None if mtu is not None else None,
            filter_ip=pinned.get("value") if pinned is not None else None,
        )
