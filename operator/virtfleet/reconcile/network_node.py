"""What a node should realise of the VMNetworks, from what the agent knows: pure.

The agent knows three things: the VMNetworks (spec and the controller's status: VNI,
DHCP address, the IPAM record), the VMs on its node plus those migrating to it (their
NICs of ``type: network``), and the other nodes' tunnel addresses (VMHost status). From
them follow, without I/O:

* whether a VM's NIC may attach at all (:func:`attachment_problem`), the reason a VM is
  not made otherwise (a Stalled condition the user can act on);
* where each NIC plugs in (:func:`attached_networks`: the network's bridge and MTU);
* the networks this node must realise (:func:`desired_networks`): one per network that
  has a member here, with head-end replication to every other node and a DHCP server
  that knows only this node's members — so a network is torn down once its last VM has
  left the node (deleted or migrated away), and is up on a migration's target before
  the switch-over;
* the cloud-init network-config of a VM (:func:`cloud_init_network_config`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from virtfleet.api.network import DEFAULT_MTU, VMNetworkSpec, VMNetworkStatus
from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.domain.inputs import AttachedNetwork
from virtfleet.identity import derive_mac
from virtfleet.netmodel import (
    DhcpConfig,
    Lease,
    LocalNetwork,
    NatGateway,
    bridge_name,
    uplink_addresses,
)
from virtfleet.reconcile.placement import NETWORK_NOT_ALLOWED, NETWORK_NOT_FOUND

__all__ = [
    "NETWORK_NOT_ALLOWED",
    "NETWORK_NOT_FOUND",
    "NETWORK_PENDING",
    "Member",
    "NetworkView",
    "RunningPort",
    "attached_networks",
    "attachment_problem",
    "cloud_init_network_config",
    "desired_networks",
    "members_of",
]

#: Not Stalled: the controller has not assigned the VNI or the address yet.
NETWORK_PENDING = "WaitingForNetwork"


@dataclass(frozen=True)
class NetworkView:
    """A VMNetwork as the agent uses it (spec and the controller's status)."""

    name: str
    spec: VMNetworkSpec
    vni: int | None = None
    dhcp_address: str | None = None
    #: ``(vm uid, interface name)`` → address, the controller's IPAM record.
    addresses: Mapping[tuple[str, str], str] = field(default_factory=dict)
    #: ``(vm uid, interface name)`` → VM name (the DHCP host name).
    hostnames: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NetworkView:
        """Raises pydantic's ValidationError for a body the agent cannot use."""
        spec = VMNetworkSpec.model_validate(body.get("spec") or {})
        status = VMNetworkStatus.model_validate(body.get("status") or {})
        return cls(
            name=str(body["metadata"]["name"]),
            spec=spec,
            vni=status.vni,
            dhcp_address=status.dhcp_address if spec.dhcp_enabled else None,
            addresses={(a.uid, a.interface): a.address for a in status.addresses},
            hostnames={(a.uid, a.interface): a.vm for a in status.addresses},
        )

    @property
    def mtu(self) -> int:
        return self.spec.mtu or DEFAULT_MTU

    @property
    def prefix_length(self) -> int | None:
        if self.spec.subnet is None:
            return None
        return ipaddress.ip_network(self.spec.subnet, strict=False).prefixlen


@dataclass(frozen=True)
class RunningPort:
    """A tap of a running domain on a bridge (libvirt's view; the domain UUID is the VM's
    uid)."""

    bridge: str
    tap: str
    uid: str
    mac: str | None = None


@dataclass(frozen=True)
class Member:
    """One NIC of a VM on this node (or migrating to it) on a VMNetwork."""

    uid: str
    namespace: str
    vm: str
    interface: str
    mac: str
    network: str


def members_of(namespace: str, vm: str, uid: str, spec: VirtualMachineSpec) -> list[Member]:
    return [
        Member(
            uid=uid,
            namespace=namespace,
            vm=vm,
            interface=nic.name,
            mac=nic.mac_for(uid),
            network=nic.network,
        )
        for nic in spec.interfaces
        if nic.type == InterfaceType.NETWORK and nic.network is not None
    ]


def attachment_problem(
    namespace: str, uid: str, spec: VirtualMachineSpec, networks: Mapping[str, NetworkView]
) -> tuple[str, str] | None:
    """``(reason, message)`` when a NIC cannot attach yet (or ever); None when all can."""
    for member in members_of(namespace, "", uid, spec):
        view = networks.get(member.network)
        if view is None:
            return NETWORK_NOT_FOUND, (
                f"interface {member.interface!r}: VMNetwork {member.network!r} does not exist "
                "(a cluster admin creates it; the VM is made once it does)"
            )
        if not view.spec.allows(namespace):
            return NETWORK_NOT_ALLOWED, (
                f"interface {member.interface!r}: VMNetwork {member.network!r} does not allow "
                f"namespace {namespace!r} (a cluster admin adds it to the network's "
                "spec.namespaces)"
            )
        if view.vni is None:
            return NETWORK_PENDING, (
                f"interface {member.interface!r}: VMNetwork {member.network!r} has no VNI "
                "yet (the controller assigns one)"
            )
        if view.spec.subnet is not None and (uid, member.interface) not in view.addresses:
            return NETWORK_PENDING, (
                f"interface {member.interface!r}: no address on VMNetwork "
                f"{member.network!r} yet (the controller allocates one)"
            )
    return None


def attached_networks(
    uid: str, spec: VirtualMachineSpec, networks: Mapping[str, NetworkView]
) -> dict[str, AttachedNetwork]:
    """NIC name → bridge, MTU and address; only after :func:`attachment_problem` said None."""
    out: dict[str, AttachedNetwork] = {}
    for nic in spec.interfaces:
        if nic.type != InterfaceType.NETWORK or nic.network is None:
            continue
        view = networks[nic.network]
        assert view.vni is not None
        out[nic.name] = AttachedNetwork(
            bridge=bridge_name(view.vni),
            mtu=view.mtu,
            address=view.addresses.get((uid, nic.name)),
        )
    return out


def desired_networks(
    members: Iterable[Member],
    networks: Mapping[str, NetworkView],
    *,
    tunnel_address: str,
    peers: Iterable[str],
    ports: Iterable[RunningPort] = (),
) -> list[LocalNetwork]:
    """The networks this node realises: those with a member here that can attach, and
    those a running domain is plugged into.

    ``members``: from the VMs placed here and those migrating here; ``ports``: what runs
    (libvirt). A running domain keeps its network, and its lease, whether or not its VM
    is known yet (an agent just started, a migration that just ended), as long as the
    controller's record names its uid. ``peers``: the other nodes' tunnel addresses (all
    of them: a node without the VNI drops its frames). Only the taps of the network's own
    VMs are (re-)attached to its bridge. Two networks with one VNI (a moment of a
    renumbering) realise neither.
    """
    by_vni: dict[int, list[str]] = {}
    for name, view in networks.items():
        if view.vni is not None:
            by_vni.setdefault(view.vni, []).append(name)
    usable = {
        name: view
        for name, view in networks.items()
        if view.vni is not None and len(by_vni[view.vni]) == 1
    }
    by_network: dict[str, list[Member]] = {}
    for member in members:
        found = usable.get(member.network)
        if found is None or not found.spec.allows(member.namespace):
            continue
        by_network.setdefault(member.network, []).append(member)
    running = list(ports)
    taps: dict[str, list[str]] = {}
    for name, view in usable.items():
        assert view.vni is not None
        bridge = bridge_name(view.vni)
        known = {m.uid for m in by_network.get(name, ())} | {uid for uid, _ in view.addresses}
        on_bridge = [p for p in running if p.bridge == bridge and p.uid in known]
        if not on_bridge:
            continue
        taps[name] = sorted({p.tap for p in on_bridge})
        listed = by_network.setdefault(name, [])
        present = {(m.uid, m.mac) for m in listed}
        listed += [
            m for m in _members_from_ports(name, view, on_bridge) if (m.uid, m.mac) not in present
        ]
    others = tuple(sorted({p for p in peers if p and p != tunnel_address}))
    uplinks = uplink_addresses(
        usable[name].vni or 0 for name in by_network if usable[name].spec.nat_enabled
    )
    out: list[LocalNetwork] = []
    for name, on_network in sorted(by_network.items()):
        view = usable[name]
        assert view.vni is not None
        out.append(
            LocalNetwork(
                name=name,
                vni=view.vni,
                tunnel_address=tunnel_address,
                peers=others,
                mtu=view.mtu,
                dhcp=_dhcp(view, on_network, uplinks.get(view.vni)),
                taps=tuple(taps.get(name, ())),
            )
        )
    return out


def _members_from_ports(
    network: str, view: NetworkView, ports: Iterable[RunningPort]
) -> list[Member]:
    """The running domains' NICs as members, from the controller's record of their uid
    (the interface whose derived MAC is the tap's, else the uid's only one)."""
    out = []
    for port in ports:
        records = [(uid, nic) for uid, nic in view.addresses if uid == port.uid]
        chosen = [r for r in records if port.mac and derive_mac(r[0], r[1]).lower() == port.mac]
        if not chosen and len(records) == 1:
            chosen = records
        for uid, interface in chosen[:1]:
            out.append(
                Member(
                    uid=uid,
                    namespace="",
                    vm=view.hostnames.get((uid, interface), ""),
                    interface=interface,
                    mac=port.mac or derive_mac(uid, interface).lower(),
                    network=network,
                )
            )
    return out


def _dhcp(view: NetworkView, members: list[Member], uplink: str | None) -> DhcpConfig | None:
    if view.dhcp_address is None or view.prefix_length is None:
        return None
    gateway = view.spec.gateway
    nat = NatGateway(gateway, uplink) if gateway and uplink and view.spec.nat_enabled else None
    leases = sorted(
        {
            Lease(
                mac=m.mac,
                ip=view.addresses[(m.uid, m.interface)],
                hostname=view.hostnames.get((m.uid, m.interface), m.vm),
            )
            for m in members
            if (m.uid, m.interface) in view.addresses
        },
        key=lambda lease: (lease.ip, lease.mac),
    )
    return DhcpConfig(
        address=view.dhcp_address,
        prefix_length=view.prefix_length,
        gateway=gateway,
        leases=tuple(leases),
        nat=nat,
    )


def cloud_init_network_config(
    uid: str, spec: VirtualMachineSpec, networks: Mapping[str, NetworkView]
) -> str | None:
    """A netplan v2 network-config giving each VMNetwork NIC its address (by MAC; the
    other NICs DHCP, as cloud-init's fallback would), or None when the VM has no
    VMNetwork NIC with an address. The same addresses DHCP serves: a guest configured
    either way ends up alike."""
    ethernets: dict[str, Any] = {}
    static = False
    for nic in spec.interfaces:
        mac = nic.mac_for(uid)
        config: dict[str, Any] = {"match": {"macaddress": mac}, "dhcp4": True}
        view = networks.get(nic.network or "") if nic.type == InterfaceType.NETWORK else None
        if view is not None and nic.type == InterfaceType.NETWORK:
            address = view.addresses.get((uid, nic.name))
            if address is None or view.prefix_length is None:
                config = {"match": {"macaddress": mac}, "mtu": view.mtu}
            else:
                static = True
                config = {
                    "match": {"macaddress": mac},
                    "addresses": [f"{address}/{view.prefix_length}"],
                    "mtu": view.mtu,
                }
                if view.spec.gateway is not None:
                    config["routes"] = [{"to": "default", "via": view.spec.gateway}]
        ethernets[nic.name] = config
    if not static:
        return None
    return yaml.safe_dump({"version": 2, "ethernets": ethernets}, sort_keys=False)
