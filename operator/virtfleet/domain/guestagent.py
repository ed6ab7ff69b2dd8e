"""What qemu-guest-agent says about a guest, reduced to values: pure.

libvirt answers ``virDomainGetGuestInfo`` with flat typed parameters (``os.name``,
``fs.0.mountpoint``...) and ``virDomainInterfaceAddresses(SRC_AGENT)`` with a dict per
guest interface; :mod:`virtfleet.hypervisor.guestagent` makes the calls, this module reads
the answers and the live domain XML (whether the agent's channel is connected at all: a
guest without an agent costs no agent call, and so no timeout).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from virtfleet.domain.config.devices import GUEST_AGENT_CHANNEL

__all__ = [
    "AgentFilesystem",
    "AgentInterface",
    "GuestAgentReport",
    "channel_connected",
    "report_from",
]

#: What a guest may put into status at most: it is the guest's word, and a guest with
#: hundreds of mounts or addresses (or a hostile one) must not bloat the object.
MAX_FILESYSTEMS = 16
MAX_ADDRESSES = 16
MAX_INTERFACES = 16
MAX_TEXT = 256


@dataclass(frozen=True)
class AgentInterface:
    name: str
    mac: str | None
    #: Addresses without prefix length, IPv4 first; no loopback or link-local.
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentFilesystem:
    """Mount point and type only: usage changes all the time, and status is written
    only when something changed."""

    mount_point: str
    type: str | None = None


@dataclass(frozen=True)
class GuestAgentReport:
    """``connected`` False: no agent listens (or it did not answer, ``error`` says)."""

    connected: bool
    error: str | None = None
    #: The agent said it is frozen (it refuses everything but thaw while so).
    frozen: bool = False
    os_id: str | None = None
    os_name: str | None = None
    os_pretty_name: str | None = None
    os_version: str | None = None
    kernel_release: str | None = None
    hostname: str | None = None
    interfaces: tuple[AgentInterface, ...] = ()
    filesystems: tuple[AgentFilesystem, ...] = ()


def channel_connected(domain_xml: str) -> bool:
    """Whether the live domain's guest agent channel says ``state='connected'``."""
    root = etree.fromstring(domain_xml.encode())
    for target in root.iterfind("devices/channel/target"):
        if target.get("name") == GUEST_AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def _text(info: Mapping[str, Any], key: str) -> str | None:
    value = info.get(key)
    return str(value)[:MAX_TEXT] if value not in (None, "") else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):  # the guest's word: a garbled count counts as none
        return None


def _addresses(raw: Any) -> tuple[str, ...]:
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entry in raw or ():
        try:
            address = ipaddress.ip_address(str(entry.get("addr")))
        except ValueError:  # the guest's word: what is not an address is not reported
            continue
        if not (address.is_loopback or address.is_link_local):
            found.append(address)
    found.sort(key=lambda a: (a.version, int(a)))
    return tuple(str(a) for a in found)[:MAX_ADDRESSES]


def report_from(info: Mapping[str, Any], interfaces: Mapping[str, Any]) -> GuestAgentReport:
    """A connected agent's answers (``guestInfo`` parameters, ``interfaceAddresses``)."""
    nics = tuple(
        AgentInterface(
            name=str(name)[:MAX_TEXT],
            mac=str(data.get("hwaddr")).lower() if data.get("hwaddr") else None,
            addresses=_addresses(data.get("addrs")),
        )
        for name, data in sorted(interfaces.items())
        if name != "lo" and isinstance(data, Mapping)
    )[:MAX_INTERFACES]
    count = _int(info.get("fs.count")) or 0
    filesystems = tuple(
        AgentFilesystem(
            mount_point=str(info[f"fs.{i}.mountpoint"])[:MAX_TEXT],
            type=_text(info, f"fs.{i}.fstype"),
        )
        for i in range(count)
        if info.get(f"fs.{i}.mountpoint")
    )[:MAX_FILESYSTEMS]
    return GuestAgentReport(
        connected=True,
        os_id=_text(info, "os.id"),
        os_name=_text(info, "os.name"),
        os_pretty_name=_text(info, "os.pretty-name"),
        os_version=_text(info, "os.version"),
        kernel_release=_text(info, "os.kernel-release"),
        hostname=_text(info, "hostname"),
        interfaces=nics,
        filesystems=filesystems,
    )
