"""The tap devices of running domains on host bridges: what a re-made bridge must get back.

libvirt makes a tap per ``<interface type='bridge'>`` when a domain starts (and on an
incoming migration) and enslaves it to the bridge; when the bridge is deleted behind
everybody's back the taps stay, masterless. The agent re-attaches them from this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from virtfleet.hypervisor import errors

__all__ = ["BridgePort", "bridge_ports"]


@dataclass(frozen=True)
class BridgePort:
    uuid: str
    bridge: str
    tap: str
    mac: str | None


def bridge_ports(conn: Any) -> list[BridgePort]:
    """Worker thread: every bridge NIC with a tap of every active domain."""
    found: list[BridgePort] = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            xml = dom.XMLDesc(0)
            uuid = dom.UUIDString()
        except libvirt.libvirtError as exc:
            if isinstance(errors.translate(exc), errors.NotFound):
                continue  # stopped mid-scan
            raise
        found += _ports(uuid, xml)
    return found


def _ports(uuid: str, xml: str) -> list[BridgePort]:
    root = etree.fromstring(xml.encode(), parser=etree.XMLParser(resolve_entities=False))
    ports = []
    for nic in root.iterfind("devices/interface[@type='bridge']"):
        source, target, mac = nic.find("source"), nic.find("target"), nic.find("mac")
        bridge = source.get("bridge") if source is not None else None
        tap = target.get("dev") if target is not None else None
        if bridge and tap:
            address = mac.get("address") if mac is not None else None
            ports.append(BridgePort(uuid, bridge, tap, address.lower() if address else None))
    return ports
