"""The network interfaces of a VirtualMachine: type, model, MAC and bandwidth.

``type: network`` attaches a NIC to a VMNetwork (:mod:`virtfleet.api.network`) by name.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from virtfleet.api.base import ApiModel, CelRule, DnsLabel, DnsSubdomain
from virtfleet.identity import derive_mac, is_derived_range

MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
MacAddress = Annotated[str, StringConstraints(pattern=MAC_PATTERN, max_length=17)]

#: The CRD has no defaults (DESIGN §3.1), so CEL treats an absent field as its default.
_INTERFACE_TYPE = "(has(self.type) ? self.type : 'user')"


class InterfaceType(StrEnum):
    USER = "user"
    BRIDGE = "bridge"
    NETWORK = "network"


class InterfaceModel(StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    E1000E = "e1000e"
    RTL8139 = "rtl8139"


class Bandwidth(ApiModel):
    """Traffic shaping of one direction (libvirt ``<bandwidth>``; kilobytes per second)."""

    average_kbps: int = Field(ge=1, le=2**32 - 1, alias="averageKBps")
    peak_kbps: int | None = Field(default=None, ge=1, le=2**32 - 1, alias="peakKBps")
    burst_kb: int | None = Field(default=None, ge=1, le=2**32 - 1, alias="burstKB")


class InterfaceBandwidth(ApiModel):
    inbound: Bandwidth | None = None
    outbound: Bandwidth | None = None


class Interface(ApiModel):
    name: DnsLabel = Field(description="Unique among the VM's interfaces (a DNS label).")
    type: InterfaceType = Field(
        default=InterfaceType.USER,
        description="user (default; QEMU's user-mode network, which cannot reach the node "
        "itself unless the node admin allows it), bridge (a host bridge) or network (a "
        "VMNetwork).",
    )
    bridge: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=15)]
        | None
    ) = Field(
        default=None,
        description="Host bridge name, for type bridge; the node admin allows bridges per "
        "namespace (else Stalled: NetworkNotAllowed).",
    )
    network: DnsSubdomain | None = Field(
        default=None,
        description="VMNetwork name, for type network: the NIC joins that cluster-wide L2 "
        "segment and gets its address from the network's IPAM. The VMNetwork must list the "
        "VM's namespace in spec.namespaces (else Stalled: NetworkNotAllowed).",
    )
    model: InterfaceModel = Field(
        default=InterfaceModel.VIRTIO, description="NIC model. Default virtio."
    )
    mac_address: MacAddress | None = Field(
        default=None,
        description="Unicast MAC; unset means one derived from the VM's uid and this name.",
    )
    bandwidth: InterfaceBandwidth | None = None

    def mac_for(self, uid: str) -> str:
        """The NIC's MAC in the VM of ``uid``: its own, else the derived one (lowercase)."""
        return (self.mac_address or derive_mac(uid, self.name)).lower()

    cel_rules = (
        CelRule(
            rule=f"{_INTERFACE_TYPE} == 'bridge' ? has(self.bridge) : !has(self.bridge)",
            message="bridge is required for type bridge and only allowed there",
            check=lambda i: (i.bridge is not None) == (i.type == InterfaceType.BRIDGE),
        ),
        CelRule(
            rule=f"{_INTERFACE_TYPE} == 'network' ? has(self.network) : !has(self.network)",
            message="network is required for type network and only allowed there",
            check=lambda i: (i.network is not None) == (i.type == InterfaceType.NETWORK),
        ),
        CelRule(
            rule=f"!has(self.bandwidth) || {_INTERFACE_TYPE} != 'user'",
            message="bandwidth cannot be applied to type user interfaces; "
            "use a bridge or network interface",
            check=lambda i: i.bandwidth is None or i.type != InterfaceType.USER,
        ),
        CelRule(
            rule="!has(self.macAddress) || self.macAddress.matches('^.[02468aceACE]')",
            message="macAddress must be a unicast address (first octet even), "
            "e.g. 02:00:00:00:00:01",
            check=lambda i: i.mac_address is None or int(i.mac_address[:2], 16) % 2 == 0,
            field_path=".macAddress",
        ),
        CelRule(
            rule="!has(self.macAddress) || !self.macAddress.matches('^.[eE]')",
            message="macAddress with a first octet ending in e (0e:, 1e:, ... fe:) is "
            "reserved for derived MACs; use another (e.g. 02:...) or leave it unset",
            check=lambda i: i.mac_address is None or not is_derived_range(i.mac_address),
            field_path=".macAddress",
        ),
    )
