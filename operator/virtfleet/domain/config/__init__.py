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

Modules: :mod:`.base` (:class:`XmlConfig`, safe parsing, the write helpers), :mod:`.disks`,
:mod:`.network`, :mod:`.devices` (serial, console, memballoon, rng), :mod:`.machine` (cpu,
os) and :mod:`.domain` (the root that holds them all).
"""

from virtfleet.domain.config.base import XmlConfig, parse_xml, xml_safe
from virtfleet.domain.config.devices import (
    ConsoleConfig,
    GuestAgentChannelConfig,
    MemballoonConfig,
    RngConfig,
    SerialConfig,
)
from virtfleet.domain.config.disks import ControllerConfig, DiskConfig, IoTuneConfig
from virtfleet.domain.config.domain import DomainConfig
from virtfleet.domain.config.machine import CpuConfig, OsConfig
from virtfleet.domain.config.network import BandwidthConfig, BandwidthLimit, InterfaceConfig

__all__ = [
    "BandwidthConfig",
    "BandwidthLimit",
    "ConsoleConfig",
    "ControllerConfig",
    "CpuConfig",
    "DiskConfig",
    "DomainConfig",
    "GuestAgentChannelConfig",
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
