"""``VMNetwork``: an L2 segment shared by VMs across nodes (cluster-scoped).

Each node realises a VMNetwork as a Linux bridge plus a VXLAN device with the network's
VNI; the controller assigns the VNI when the spec leaves it out and keeps the IPAM
record (``status.addresses``): one address per attached VM interface, kept while that
VM (by uid) exists, so restarts and live migrations keep their addresses.

A cluster admin owns VMNetworks; ``spec.namespaces`` says which tenants may attach.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from virtfleet.api.base import DNS_LABEL_PATTERN, ApiModel, CelRule, StatusModel
from virtfleet.api.conditions import Conditions

#: The VXLAN header takes 50 bytes of a 1500-byte underlay MTU.
DEFAULT_MTU = 1450
MAX_VNI = 2**24 - 1
#: Smallest and largest subnets: /29 leaves a few addresses for VMs, /20 keeps the
#: status list (one entry per attached interface, ~150 bytes) far below etcd's 1.5 MiB.
MIN_PREFIX = 20
MAX_PREFIX = 29
ALL_NAMESPACES = "*"
#: Dotted quads only: the schema keeps out IPv6 and netmask forms (``/255.255.0.0``) that
#: Python's parser would take and CEL's would not, so both sides judge the same strings.
IPV4_PATTERN = r"^([0-9]{1,3}\.){3}[0-9]{1,3}$"
IPV4_CIDR_PATTERN = r"^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$"

#: Every rule that reads the subnet first makes sure it parses (the apiserver runs CEL
#: even on a field that failed its pattern, and cidr() of a bad string is an error).
_SUBNET_OK = "has(self.subnet) && isCIDR(self.subnet)"
_GATEWAY_OK = "has(self.gateway) && isIP(self.gateway)"

NAMESPACE_ENTRY_PATTERN = rf"^(\*|{DNS_LABEL_PATTERN[1:-1]})$"
NamespaceEntry = Annotated[str, StringConstraints(pattern=NAMESPACE_ENTRY_PATTERN, max_length=63)]


def parse_ipv4_network(text: str | None) -> ipaddress.IPv4Network | None:
    """``text`` as an IPv4 CIDR (host bits allowed, like CEL's ``cidr()``), else None."""
    if text is None:
        return None
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return network if isinstance(network, ipaddress.IPv4Network) and "/" in text else None


def parse_ipv4_address(text: str | None) -> ipaddress.IPv4Address | None:
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address if isinstance(address, ipaddress.IPv4Address) else None


def _subnet_is_ipv4(spec: Any) -> bool:
    return spec.subnet is None or parse_ipv4_network(spec.subnet) is not None


def _prefix_in_range(spec: Any) -> bool:
    network = parse_ipv4_network(spec.subnet)
    return network is None or MIN_PREFIX <= network.prefixlen <= MAX_PREFIX


def _host_bits_zero(spec: Any) -> bool:
    network = parse_ipv4_network(spec.subnet)
    return network is None or ipaddress.ip_interface(spec.subnet).ip == network.network_address


def _gateway_is_ipv4(spec: Any) -> bool:
    return spec.gateway is None or parse_ipv4_address(spec.gateway) is not None


def _gateway_inside(spec: Any) -> bool:
    network, gateway = parse_ipv4_network(spec.subnet), parse_ipv4_address(spec.gateway)
    if network is None or gateway is None:
        return True
    return gateway in network and spec.gateway != spec.subnet.split("/")[0]


class VMNetworkSpec(ApiModel):
    """What an admin declares; consumers apply the defaults (the CRD defaults nothing)."""

    vni: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VNI,
        description="VXLAN network identifier. Unset: the controller assigns the lowest free "
        "one from 4096 up (status.vni). Cannot change once set (it may be set later).",
    )
    mtu: int | None = Field(
        default=None,
        ge=576,
        le=9000,
        description=f"MTU of the VMs' NICs and the node's bridge. Default {DEFAULT_MTU}: "
        "1500 minus the 50 bytes of VXLAN encapsulation; raise it only when the underlay "
        "carries larger frames.",
    )
    namespaces: list[NamespaceEntry] = Field(
        min_length=1,
        max_length=256,
        description="Namespaces whose VMs may attach, or the single entry '*' for all. A VM "
        "elsewhere that names this network is not placed (Stalled: NetworkNotAllowed).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    subnet: Annotated[str, StringConstraints(pattern=IPV4_CIDR_PATTERN, max_length=18)] | None = (
        Field(
            default=None,
            description="IPv4 network (e.g. 10.20.0.0/24, /20 to /29) the controller hands VM "
            "interfaces addresses from. Unset: no IPAM, no DHCP. Cannot change once set (it "
            "would renumber running VMs).",
        )
    )
    gateway: Annotated[str, StringConstraints(pattern=IPV4_PATTERN, max_length=15)] | None = Field(
        default=None,
        description="Router address inside subnet, never given to a VM; DHCP offers it as "
        "the default route. Only with subnet.",
    )
    dhcp: bool | None = Field(
        default=None,
        description="Serve DHCP on every node (from status.dhcpAddress). Default true when "
        "subnet is set; only with subnet.",
    )
    nat: bool | None = Field(
        default=None,
        description="Outbound NAT: every node with a VM on the network answers on gateway "
        "(the same address and MAC on each, so a migrated VM keeps its route) and "
        "masquerades the VMs' connections behind the node's own address. Nothing is "
        "forwarded inward; the nodes, link-local addresses, DNAT'd destinations and the "
        "ranges the admin denies (the cluster's) are not reached. Needs gateway and DHCP "
        "(which serves only the IPAM addresses cloud-init writes too). Default false.",
    )

    cel_rules = (
        CelRule(
            rule=f"!self.namespaces.exists(n, n == '{ALL_NAMESPACES}') || "
            "self.namespaces.size() == 1",
            message="namespaces: '*' (all namespaces) must be the only entry",
            check=lambda s: ALL_NAMESPACES not in s.namespaces or len(s.namespaces) == 1,
        ),
        CelRule(
            rule=None,  # the schema's list-type set refuses duplicates
            message="namespaces must be unique",
            check=lambda s: len(set(s.namespaces)) == len(s.namespaces),
        ),
        CelRule(
            rule="!has(self.subnet) || (isCIDR(self.subnet) && "
            "cidr(self.subnet).ip().family() == 4)",
            message="subnet must be an IPv4 CIDR such as 10.20.0.0/24",
            check=_subnet_is_ipv4,
            field_path=".subnet",
        ),
        CelRule(
            rule=f"!({_SUBNET_OK}) || (cidr(self.subnet).prefixLength() >= {MIN_PREFIX} && "
            f"cidr(self.subnet).prefixLength() <= {MAX_PREFIX})",
            message=f"subnet prefix length must be between /{MIN_PREFIX} and /{MAX_PREFIX}",
            check=_prefix_in_range,
            field_path=".subnet",
        ),
        CelRule(
            rule=f"!({_SUBNET_OK}) || cidr(self.subnet).masked() == cidr(self.subnet)",
            message="subnet must be the network address (host bits zero), e.g. 10.20.0.0/24",
            check=_host_bits_zero,
            field_path=".subnet",
        ),
        CelRule(
            rule="!has(self.gateway) || (isIP(self.gateway) && ip(self.gateway).family() == 4)",
            message="gateway must be an IPv4 address",
            check=_gateway_is_ipv4,
            field_path=".gateway",
        ),
        CelRule(
            rule="!has(self.gateway) || has(self.subnet)",
            message="gateway is only allowed with a subnet",
            check=lambda s: s.gateway is None or s.subnet is not None,
        ),
        CelRule(
            # Compared as text: CEL's cost estimator prices ip == ip as unbounded, and with
            # the host-bits rule the subnet's text is its network address.
            rule=f"!({_SUBNET_OK} && {_GATEWAY_OK} && ip(self.gateway).family() == 4) || "
            "(cidr(self.subnet).containsIP(ip(self.gateway)) && "
            "self.gateway != self.subnet.split('/')[0])",
            message="gateway must be a host address inside subnet",
            check=_gateway_inside,
            field_path=".gateway",
        ),
        CelRule(
            rule="!has(self.nat) || !self.nat || has(self.gateway)",
            message="nat needs a gateway: the address the nodes answer on for the VMs",
            check=lambda s: not s.nat or s.gateway is not None,
            field_path=".nat",
        ),
        CelRule(
            rule="!has(self.nat) || !self.nat || !has(self.dhcp) || self.dhcp",
            message="nat needs dhcp: each node's gateway lives beside its DHCP server "
            "(which answers only the VMs' own addresses, those cloud-init writes too)",
            check=lambda s: not s.nat or s.dhcp is not False,
            field_path=".nat",
        ),
        CelRule(
            rule="!has(self.dhcp) || has(self.subnet)",
            message="dhcp is only allowed with a subnet",
            check=lambda s: s.dhcp is None or s.subnet is not None,
        ),
        CelRule(
            rule="!has(oldSelf.vni) || (has(self.vni) && self.vni == oldSelf.vni)",
            message="vni cannot change once set; create another VMNetwork instead",
            check=lambda _: True,
            transition=True,
        ),
        CelRule(
            rule="!has(oldSelf.subnet) || (has(self.subnet) && self.subnet == oldSelf.subnet)",
            message="subnet cannot change once set (it would renumber running VMs); "
            "create another VMNetwork instead",
            check=lambda _: True,
            transition=True,
        ),
    )

    @property
    def dhcp_enabled(self) -> bool:
        return self.subnet is not None and self.dhcp is not False

    @property
    def nat_enabled(self) -> bool:
        return bool(self.nat) and self.gateway is not None and self.dhcp_enabled

    def allows(self, namespace: str) -> bool:
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces


class NetworkAddress(StatusModel):
    """One IPAM record: an address held by one VM interface while that VM exists."""

    address: str = Field(description="IPv4 address (no prefix length).")
    namespace: str
    vm: str = Field(description="The VirtualMachine's name.")
    uid: str = Field(description="The VirtualMachine's uid: the record ends with that VM.")
    interface: str = Field(description="The interface's name in the VM's spec.")


class VMNetworkStatus(StatusModel):
    """Written by the controller only."""

    observed_generation: int | None = Field(default=None, ge=0)
    vni: int | None = Field(
        default=None, ge=1, le=MAX_VNI, description="The VNI in use (spec.vni or assigned)."
    )
    dhcp_address: str | None = Field(
        default=None,
        description="The address each node's DHCP server uses on this network: the last "
        "usable address of the subnet (the one before it when that is the gateway), never "
        "given to a VM. Set while DHCP is on.",
    )
    addresses: list[NetworkAddress] = Field(
        default_factory=list,
        max_length=4096,
        description="One per attached VM interface, kept while that VM (by uid) exists: "
        "across restarts and live migrations; released when the VM is deleted.",
    )
    allocated_count: int | None = Field(
        default=None, ge=0, description="len(addresses), for kubectl get."
    )
    conditions: Conditions
