"""A node's VMNetwork plumbing as values: what should exist, what exists, what to do.

Pure and below both sides that use it: :mod:`virtfleet.reconcile.network_host` plans
with these values and :mod:`virtfleet.hostnet` observes and applies them. The two are
independent layers (the planner must not know netlink, the adapter must not decide), so
the vocabulary they share lives here, like :mod:`virtfleet.domain.jobs` for libvirt jobs.

A VMNetwork is realised on a node as a Linux bridge plus a VXLAN port (one VNI per
network) and, with DHCP, a veth port whose peer is the ``eth0`` of a dnsmasq in its own
network namespace. With NAT that namespace is also the network's gateway on the node: the
gateway address on ``eth0`` (with a MAC derived from the VNI, the same on every node),
and an uplink veth (``vfgw<vni>`` on the node, ``up0`` inside) with an address of its
own from :data:`UPLINK_RANGE`, masqueraded there and again on the node. Every name
derives from the VNI (at most 24 bits, so at most 12 characters: the kernel allows 15),
which makes "is this link ours, and whose" a parse.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from virtfleet.api.network import DEFAULT_MTU, MAX_VNI

#: IANA's VXLAN port (Linux's own default is 8472, which no other vendor speaks).
VXLAN_UDP_PORT: Final = 4789
DEFAULT_LEASE_SECONDS: Final = 3600

BRIDGE_PREFIX: Final = "vfbr"
VXLAN_PREFIX: Final = "vfvx"
DHCP_PORT_PREFIX: Final = "vfdh"
GATEWAY_PORT_PREFIX: Final = "vfgw"
_OURS = re.compile(
    rf"^({BRIDGE_PREFIX}|{VXLAN_PREFIX}|{DHCP_PORT_PREFIX}|{GATEWAY_PORT_PREFIX})([1-9][0-9]{{0,7}})$"
)
#: The NAT gateways' uplink addresses, one per network on a node: link-local (never
#: routed), away from the well-known ones (169.254.169.254, 169.254.1.1). They are only
#: ever seen between a node and its gateways: both sides masquerade.
UPLINK_RANGE: Final = ipaddress.IPv4Network("169.254.64.0/18")
#: The next hop a gateway routes to: the node's end of the uplink, by a static neighbour
#: entry (the node needs no address for it).
UPLINK_NEXT_HOP: Final = str(UPLINK_RANGE.network_address + 1)
_FINGERPRINT_LINE = "# virtfleet-fingerprint: "


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{vni}"


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def dhcp_port_name(vni: int) -> str:
    """The host end of the DHCP server's veth (its peer is ``eth0`` in dnsmasq's netns)."""
    return f"{DHCP_PORT_PREFIX}{vni}"


def gateway_port_name(vni: int) -> str:
    """The node's end of a NAT gateway's uplink (its peer is ``up0`` in dnsmasq's netns)."""
    return f"{GATEWAY_PORT_PREFIX}{vni}"


def _vni_mac(role: int, vni: int) -> str:
    """Locally administered, unicast, and apart from the VMs' derived MACs (``?e:``)."""
    return ":".join(f"{octet:02x}" for octet in (0x0A, 0x76, role, *vni.to_bytes(3, "big")))


def gateway_mac(vni: int) -> str:
    """The gateway's MAC: the same on every node, so a migrated guest's ARP entry holds."""
    return _vni_mac(1, vni)


def uplink_mac(vni: int) -> str:
    """The MAC of the node's end of the uplink (the gateway's static next hop)."""
    return _vni_mac(2, vni)


def uplink_inside_mac(vni: int) -> str:
    """The MAC of the gateway's end of the uplink (the node's static neighbour entry)."""
    return _vni_mac(3, vni)


def gateway_done_alias(nat: NatGateway) -> str:
    """What a finished gateway's uplink carries as its alias (set as the last step)."""
    return f"virtfleet NAT gateway {nat.address} via {nat.uplink}"


def uplink_addresses(vnis: Iterable[int]) -> dict[int, str]:
    """An uplink address per NAT network of a node: ``vni`` modulo the range, the next
    free one on a clash (by VNI order, so the same networks get the same addresses)."""
    first = int(UPLINK_RANGE.network_address) + 2  # past the network and the next hop
    size = UPLINK_RANGE.num_addresses - 3  # and not the broadcast address
    taken: set[int] = set()
    out: dict[int, str] = {}
    for vni in sorted(set(vnis)):
        if len(taken) == size:
            raise ValueError(f"more NAT networks on one node than {UPLINK_RANGE} holds")
        slot = vni % size
        while slot in taken:
            slot = (slot + 1) % size
        taken.add(slot)
        out[vni] = str(ipaddress.IPv4Address(first + slot))
    return out


def vni_of(ifname: str) -> int | None:
    """The VNI of one of our links (``vfbr7`` → 7), None for anybody else's."""
    match = _OURS.match(ifname)
    if match is None:
        return None
    vni = int(match[2])
    return vni if vni <= MAX_VNI else None


def fingerprint(text: str) -> str:
    """A short digest that says whether a running dnsmasq has the config we want."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_fingerprint(body: str) -> str:
    """``body`` headed by its fingerprint, so the file says what it is on its own."""
    return f"{_FINGERPRINT_LINE}{fingerprint(body)}\n{body}"


def read_fingerprint(text: str) -> str | None:
    """The fingerprint :func:`with_fingerprint` wrote, None for anything else."""
    first = text.partition("\n")[0]
    if not first.startswith(_FINGERPRINT_LINE):
        return None
    return first.removeprefix(_FINGERPRINT_LINE).strip() or None


# --- Desired ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """A fixed address for one VM NIC: dnsmasq answers known MACs only."""

    mac: str
    ip: str
    hostname: str = ""


@dataclass(frozen=True)
class NatGateway:
    """The network's gateway on this node: NAT out of the node's own address."""

    #: The gateway address (``spec.gateway``), on the DHCP namespace's ``eth0``.
    address: str
    #: That namespace's uplink address (:func:`uplink_addresses`).
    uplink: str


@dataclass(frozen=True)
class DhcpConfig:
    #: The server's address: the same on every node (the isolated ports keep the node
    #: servers apart), reserved by the controller out of the network's range.
    address: str
    prefix_length: int
    #: Offered as the default route; None: no router option (an isolated segment).
    gateway: str | None = None
    leases: tuple[Lease, ...] = ()
    dns_servers: tuple[str, ...] = ()
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    #: This node answers on ``gateway`` and masquerades (``spec.nat``); None: it does not.
    nat: NatGateway | None = None


@dataclass(frozen=True)
class LocalNetwork:
    """One VMNetwork as this node should realise it (it has a VM on it)."""

    name: str
    vni: int
    #: This node's underlay address: the VXLAN's source.
    tunnel_address: str
    #: The other nodes' underlay addresses: broadcast and unknown frames go to each.
    peers: tuple[str, ...] = ()
    mtu: int = DEFAULT_MTU
    dhcp: DhcpConfig | None = None
    #: The tap devices of this node's VMs on the network (only existing ones matter).
    taps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.vni <= MAX_VNI:
            raise ValueError(f"VNI {self.vni} of network {self.name} is not in 1..{MAX_VNI}")
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"MTU {self.mtu} of network {self.name} is not in 68..65535")


# --- Observed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedLink:
    """One network device, reduced to what the planner compares."""

    name: str
    #: The kernel's link kind (``bridge``, ``vxlan``, ``veth``, ``tun``); "" if none.
    kind: str
    mtu: int
    #: Administratively up.
    up: bool = True
    #: The bridge it is a port of.
    master: str | None = None
    #: The bridge port flag IFLA_BRPORT_ISOLATED.
    isolated: bool = False
    #: Whether the kernel gives it an IPv6 link-local address (addrgenmode not none).
    ipv6_link_local: bool = False
    #: Its ``ifalias``: a NAT gateway's uplink says there that it is finished, and how.
    alias: str = ""
    # vxlan
    vni: int | None = None
    local: str | None = None
    udp_port: int | None = None
    learning: bool | None = None
    # bridge
    stp: bool | None = None
    #: Centiseconds, as the kernel reports it.
    forward_delay: int | None = None


@dataclass(frozen=True)
class ObservedDhcp:
    """A network's dnsmasq as its state files and /proc tell."""

    vni: int
    #: The running dnsmasq (pidfile and /proc agree); None: not running.
    pid: int | None
    #: Of the config it was started with.
    config_fingerprint: str | None = None
    #: Of the hosts file it last (re)loaded.
    hosts_fingerprint: str | None = None


@dataclass(frozen=True)
class ObservedHost:
    #: Every link of the node by name (ours, and the taps the planner attaches).
    links: Mapping[str, ObservedLink] = field(default_factory=dict)
    #: VXLAN name → the peers of its all-zeros (flood) FDB entries.
    flood: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: VNI → its dnsmasq, for every network that has DHCP state on the node.
    dhcp: Mapping[int, ObservedDhcp] = field(default_factory=dict)


# --- Actions ------------------------------------------------------------------------------
# Every action names its network (its VNI), says why in words (an Event's message) and
# whether it repairs DRIFT: something virtfleet had made and someone undid.


@dataclass(frozen=True)
class EnsureBridge:
    """Create the bridge, or set what differs: MTU, STP off, forward delay 0, up."""

    network: str
    vni: int
    mtu: int
    #: A link of that name but of another kind is in the way: delete it first.
    replace: bool = False
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class EnsureVxlan:
    """Create the VXLAN (learning on, port 4789), or set MTU and up on the existing one."""

    network: str
    vni: int
    local: str
    mtu: int
    #: Delete the existing one first: what it was made with cannot be changed in place.
    recreate: bool = False
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class EnsurePort:
    """Make ``ifname`` an up port of the network's bridge with that isolation flag."""

    network: str
    vni: int
    ifname: str
    isolated: bool
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class SetFloodPeers:
    """Add and remove all-zeros FDB entries (head-end replication to each peer)."""

    network: str
    vni: int
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class StartDhcp:
    """(Re)start the network's dnsmasq in a namespace of its own and plug it in."""

    network: str
    vni: int
    address: str
    prefix_length: int
    mtu: int
    #: dnsmasq's config and hosts file, rendered (the config headed by its fingerprint).
    config: str
    hosts: str
    hosts_fingerprint: str
    #: Its ``eth0`` is also the network's NAT gateway (:class:`PlugGateway` follows):
    #: the gateway's MAC is set before the link is up.
    nat: NatGateway | None = None
    #: Stop the running one first.
    restart: bool = False
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class PlugGateway:
    """Make the network's NAT gateway in its running dnsmasq's namespace (its uplink to
    the node last): from scratch each time, so a pass cut short is simply done again."""

    network: str
    vni: int
    mtu: int
    prefix_length: int
    nat: NatGateway
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ReloadDhcp:
    """Rewrite the hosts file and have dnsmasq re-read it (SIGHUP): leases changed."""

    network: str
    vni: int
    hosts: str
    hosts_fingerprint: str
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class StopDhcp:
    """Stop the network's dnsmasq and remove its port and state files."""

    network: str
    vni: int
    drift: bool = False
    reason: str = ""


@dataclass(frozen=True)
class RemoveNetwork:
    """Tear down a network the node no longer realises: dnsmasq, links, state."""

    vni: int
    links: tuple[str, ...]
    dhcp: bool
    network: str = ""
    drift: bool = False
    reason: str = ""


NetworkAction = (
    EnsureBridge
    | EnsureVxlan
    | EnsurePort
    | SetFloodPeers
    | StartDhcp
    | PlugGateway
    | ReloadDhcp
    | StopDhcp
    | RemoveNetwork
)
