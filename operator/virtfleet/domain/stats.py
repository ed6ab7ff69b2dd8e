"""A running domain's usage, read from libvirt's bulk statistics: pure.

``virConnectGetAllDomainStats`` answers every running domain's counters in one call, as
flat typed parameters (``cpu.time``, ``block.0.wr.bytes``, ``net.1.rx.pkts``...). This
module turns one domain's parameters into values in base units (seconds, bytes), and
names its devices as the VM's spec does (``block.0.name`` is a target such as ``vda``,
``net.0.name`` a tap such as ``vnet3``: :func:`device_names` maps them through the live
XML's ``ua-`` aliases), so metrics say ``drive="data"``, ``interface="lan"`` like
KubeVirt's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from virtfleet.domain.config.base import parse_xml
from virtfleet.domain.naming import disk_name_from_alias, interface_name_from_alias

__all__ = [
    "BlockUsage",
    "DeviceNames",
    "DomainUsage",
    "NetUsage",
    "device_names",
    "usage_from_stats",
]

_NS_PER_S = 1e9
_KIB = 1024


@dataclass(frozen=True)
class BlockUsage:
    name: str
    read_bytes: int = 0
    write_bytes: int = 0
    read_requests: int = 0
    write_requests: int = 0
    flush_requests: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    flush_seconds: float = 0.0


@dataclass(frozen=True)
class NetUsage:
    name: str
    receive_bytes: int = 0
    transmit_bytes: int = 0
    receive_packets: int = 0
    transmit_packets: int = 0
    receive_errors: int = 0
    transmit_errors: int = 0
    receive_drops: int = 0
    transmit_drops: int = 0


@dataclass(frozen=True)
class DomainUsage:
    """Counters of one running domain; ``None``: libvirt did not say (no balloon...)."""

    cpu_seconds: float | None = None
    cpu_user_seconds: float | None = None
    cpu_system_seconds: float | None = None
    vcpus: int | None = None
    memory_domain_bytes: int | None = None
    memory_resident_bytes: int | None = None
    memory_available_bytes: int | None = None
    memory_unused_bytes: int | None = None
    blocks: tuple[BlockUsage, ...] = ()
    nets: tuple[NetUsage, ...] = ()


@dataclass(frozen=True)
class DeviceNames:
    """libvirt's device names → the spec's: disk target → disk name, tap → NIC name."""

    disks: Mapping[str, str] = field(default_factory=dict)
    nics: Mapping[str, str] = field(default_factory=dict)


def device_names(domain_xml: str) -> DeviceNames:
    """Read from a live domain XML (taps exist only while it runs)."""
    root = parse_xml(domain_xml)
    disks: dict[str, str] = {}
    for disk in root.iterfind("devices/disk"):
        target, name = _target_and_name(disk, "dev")
        spec = disk_name_from_alias(name)
        if target and spec:
            disks[target] = spec
    nics: dict[str, str] = {}
    for nic in root.iterfind("devices/interface"):
        target, name = _target_and_name(nic, "dev")
        spec = interface_name_from_alias(name)
        if target and spec:
            nics[target] = spec
    return DeviceNames(disks=disks, nics=nics)


def _target_and_name(element: etree._Element, attribute: str) -> tuple[str | None, str | None]:
    target = element.find("target")
    alias = element.find("alias")
    return (
        target.get(attribute) if target is not None else None,
        alias.get("name") if alias is not None else None,
    )


def usage_from_stats(stats: Mapping[str, Any], names: DeviceNames | None = None) -> DomainUsage:
    """One domain's ``getAllDomainStats`` parameters as :class:`DomainUsage`.

    Devices libvirt names but the spec does not (a foreign disk, a user-mode NIC without
    a tap) keep libvirt's name; unnamed ones are skipped.
    """
    names = names or DeviceNames()
    blocks = []
    for index in range(_int(stats.get("block.count")) or 0):
        prefix = f"block.{index}."
        device = stats.get(prefix + "name")
        if not device:
            continue
        blocks.append(
            BlockUsage(
                name=names.disks.get(str(device), str(device)),
                read_bytes=_int(stats.get(prefix + "rd.bytes")) or 0,
                write_bytes=_int(stats.get(prefix + "wr.bytes")) or 0,
                read_requests=_int(stats.get(prefix + "rd.reqs")) or 0,
                write_requests=_int(stats.get(prefix + "wr.reqs")) or 0,
                flush_requests=_int(stats.get(prefix + "fl.reqs")) or 0,
                read_seconds=(_int(stats.get(prefix + "rd.times")) or 0) / _NS_PER_S,
                write_seconds=(_int(stats.get(prefix + "wr.times")) or 0) / _NS_PER_S,
                flush_seconds=(_int(stats.get(prefix + "fl.times")) or 0) / _NS_PER_S,
            )
        )
    nets = []
    for index in range(_int(stats.get("net.count")) or 0):
        prefix = f"net.{index}."
        device = stats.get(prefix + "name")
        if not device:
            continue
        nets.append(
            NetUsage(
                name=names.nics.get(str(device), str(device)),
                receive_bytes=_int(stats.get(prefix + "rx.bytes")) or 0,
                transmit_bytes=_int(stats.get(prefix + "tx.bytes")) or 0,
                receive_packets=_int(stats.get(prefix + "rx.pkts")) or 0,
                transmit_packets=_int(stats.get(prefix + "tx.pkts")) or 0,
                receive_errors=_int(stats.get(prefix + "rx.errs")) or 0,
                transmit_errors=_int(stats.get(prefix + "tx.errs")) or 0,
                receive_drops=_int(stats.get(prefix + "rx.drop")) or 0,
                transmit_drops=_int(stats.get(prefix + "tx.drop")) or 0,
            )
        )
    return DomainUsage(
        cpu_seconds=_seconds(stats.get("cpu.time")),
        cpu_user_seconds=_seconds(stats.get("cpu.user")),
        cpu_system_seconds=_seconds(stats.get("cpu.system")),
        vcpus=_int(stats.get("vcpu.current")),
        memory_domain_bytes=_kib(stats.get("balloon.current")),
        memory_resident_bytes=_kib(stats.get("balloon.rss")),
        memory_available_bytes=_kib(stats.get("balloon.available")),
        memory_unused_bytes=_kib(stats.get("balloon.unused")),
        blocks=tuple(blocks),
        nets=tuple(nets),
    )


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _seconds(value: Any) -> float | None:
    number = _int(value)
    return number / _NS_PER_S if number is not None else None


def _kib(value: Any) -> int | None:
    number = _int(value)
    return number * _KIB if number is not None else None
