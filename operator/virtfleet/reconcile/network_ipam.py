"""VMNetwork bookkeeping as pure functions: VNIs, addresses, and whether a VM may attach.

* :func:`assign_vnis` — every network gets one VNI, unique across the cluster, and a VNI
  in use (``status.vni``) never moves (its VMs are plugged into its bridges). A pinned
  ``spec.vni`` takes a free VNI unless an older network (creation time, then name) pins
  the same one or uses it: the newer network is refused (``VniConflict``) and gets
  none; a pin that differs from the VNI in use is refused too (the VNI is kept). The
  others get the lowest free one from :data:`FIRST_AUTO_VNI` up.
* :func:`allocate` — the IPAM of one network. An allocation is kept while its VM (by uid)
  still has that interface on this network, so restarts and migrations keep addresses;
  the rest are released. New attachments get the lowest free address, oldest VM first,
  never the network or broadcast address, the gateway or the DHCP server's address.
  Attachments from namespaces the network does not allow are refused
  (``NetworkNotAllowed``), and so are those left over when the subnet is full
  (``AddressesExhausted``). A network without a subnet allocates nothing.
* :func:`network_status` — the status the controller writes.
* :func:`attachment_hold` — why a VM may not be placed yet because of one network.

Removing a namespace from ``spec.namespaces`` refuses new attachments; VMs already
holding an address keep it (it is released when they are deleted), but an unplaced one
is not placed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtfleet.api.conditions import (
    ConditionStatus,
    kstatus_conditions,
    read_conditions,
    write_conditions,
)
from virtfleet.api.network import (
    MAX_VNI,
    NetworkAddress,
    VMNetworkSpec,
    parse_ipv4_address,
    parse_ipv4_network,
)
from virtfleet.reconcile.placement import (
    ADDRESSES_EXHAUSTED,
    NETWORK_NOT_ALLOWED,
    NETWORK_NOT_FOUND,
    NETWORK_NOT_READY,
    WAITING_FOR_NETWORK,
    Unschedulable,
)

#: Assigned VNIs start here, leaving 1..4095 to admins who pin theirs.
FIRST_AUTO_VNI = 4096

VNI_CONFLICT = "VniConflict"
VNI_ASSIGNED = "VniAssigned"
#: A deleted network waits for the VMs that name it (finalizer ``virtfleet.io/network-in-use``).
WAITING_FOR_DETACH = "WaitingForDetach"


@dataclass(frozen=True)
class NetworkVni:
    """What VNI assignment reads from one VMNetwork."""

    name: str
    #: metadata.creationTimestamp (RFC 3339 sorts by time).
    created: str
    spec_vni: int | None
    status_vni: int | None


@dataclass(frozen=True)
class VniAssignment:
    vnis: Mapping[str, int]
    #: Network name → why it has no VNI.
    conflicts: Mapping[str, str]


def _age(network: NetworkVni) -> tuple[str, str]:
    return (network.created, network.name)


def assign_vnis(networks: Iterable[NetworkVni]) -> VniAssignment:
    """One unique VNI per network (see the module doc for who wins).

    A VNI in use (``status.vni``) never moves: running domains are plugged into its
    bridge on every node, and another network taking it would put them on that network.
    So a VNI in use is kept first; a pin (``spec.vni``) then takes a free VNI (the older
    pin wins); the rest get the lowest free one from FIRST_AUTO_VNI up.
    """
    ordered = sorted(networks, key=_age)
    vnis: dict[str, int] = {}
    conflicts: dict[str, str] = {}
    owner: dict[int, str] = {}
    for network in ordered:
        kept = network.status_vni
        if kept is None or kept in owner:
            continue
        owner[kept] = network.name
        vnis[network.name] = kept
        if network.spec_vni is not None and network.spec_vni != kept:
            conflicts[network.name] = (
                f"spec.vni {network.spec_vni} differs from VNI {kept}, which the network "
                "uses: a VNI in use cannot change (its VMs are plugged into it on every "
                f"node); set spec.vni to {kept} or remove it, or create another VMNetwork"
            )
    for network in ordered:
        if network.name in vnis or network.spec_vni is None:
            continue
        holder = owner.get(network.spec_vni)
        if holder is not None:
            conflicts[network.name] = (
                f"spec.vni {network.spec_vni} is already used by VMNetwork {holder}; choose "
                "another vni or leave it unset (one is assigned)"
            )
            continue
        owner[network.spec_vni] = network.name
        vnis[network.name] = network.spec_vni
    candidate = FIRST_AUTO_VNI
    for network in ordered:
        if network.name in vnis or network.name in conflicts:
            continue
        while candidate in owner:
            candidate += 1
        if candidate > MAX_VNI:
            conflicts[network.name] = "no free VNI is left"
            continue
        owner[candidate] = network.name
        vnis[network.name] = candidate
    return VniAssignment(vnis=vnis, conflicts=conflicts)


@dataclass(frozen=True, order=True)
class Attachment:
    """One VM interface that names a network (``type: network``)."""

    #: Sort key first: older VMs get addresses first when few are left.
    created: str
    namespace: str
    vm: str
    uid: str
    interface: str
    #: A VM being deleted keeps its address until it is gone, but gets no new one.
    deleting: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.uid, self.interface)


@dataclass(frozen=True)
class Refusal:
    reason: str  # NetworkNotAllowed | AddressesExhausted
    message: str


@dataclass(frozen=True)
class Allocation:
    """The IPAM outcome of one network."""

    addresses: tuple[NetworkAddress, ...] = ()
    #: (uid, interface) → why that attachment has no address.
    refused: Mapping[tuple[str, str], Refusal] = field(default_factory=dict)
    #: Where each node's DHCP server sits (set while DHCP is on).
    dhcp_address: str | None = None


@dataclass(frozen=True)
class Reserved:
    """The addresses of a subnet that no VM gets."""

    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    dhcp: ipaddress.IPv4Address

    def usable(self, address: ipaddress.IPv4Address) -> bool:
        return (
            address in self.network
            and address not in (self.network.network_address, self.network.broadcast_address)
            and address not in (self.gateway, self.dhcp)
        )


def reserved_addresses(spec: VMNetworkSpec) -> Reserved | None:
    """The subnet and its reserved addresses; None without a (readable) subnet."""
    network = parse_ipv4_network(spec.subnet)
    if network is None:
        return None
    gateway = parse_ipv4_address(spec.gateway)
    last = network.broadcast_address - 1
    dhcp = last - 1 if gateway == last else last
    return Reserved(network=network, gateway=gateway, dhcp=dhcp)


def spec_problem(spec: VMNetworkSpec) -> str | None:
    """A spec the apiserver accepts but that cannot work (the CEL rules cannot compute a
    broadcast address)."""
    reserved = reserved_addresses(spec)
    if reserved is not None and reserved.gateway == reserved.network.broadcast_address:
        return f"gateway {reserved.gateway} is the broadcast address of {spec.subnet}"
    return None


def _record(attachment: Attachment, address: ipaddress.IPv4Address) -> NetworkAddress:
    return NetworkAddress(
        address=str(address),
        namespace=attachment.namespace,
        vm=attachment.vm,
        uid=attachment.uid,
        interface=attachment.interface,
    )


def allocate(
    name: str,
    spec: VMNetworkSpec,
    current: Sequence[NetworkAddress],
    attachments: Iterable[Attachment],
) -> Allocation:
    """The addresses of network ``name`` (see the module doc for the rules)."""
    refused: dict[tuple[str, str], Refusal] = {}
    wanted: dict[tuple[str, str], Attachment] = {}
    for attachment in sorted(attachments):
        if attachment.key in wanted:
            continue
        wanted[attachment.key] = attachment
    reserved = reserved_addresses(spec)
    if reserved is None:
        for attachment in wanted.values():
            if not spec.allows(attachment.namespace):
                refused[attachment.key] = _not_allowed(name, attachment.namespace)
        return Allocation(refused=refused)
    kept: dict[tuple[str, str], ipaddress.IPv4Address] = {}
    taken: set[ipaddress.IPv4Address] = set()
    for record in current:
        address = parse_ipv4_address(record.address)
        key = (record.uid, record.interface)
        if key not in wanted or key in kept or address is None:
            continue  # the VM or its interface went, or a duplicate record
        if address in taken or not reserved.usable(address):
            continue  # a gateway moved onto it: the VM gets another address below
        kept[key] = address
        taken.add(address)
    free = (a for a in reserved.network.hosts() if a not in taken and reserved.usable(a))
    for key, attachment in wanted.items():
        if key in kept:
            continue
        if not spec.allows(attachment.namespace):
            refused[key] = _not_allowed(name, attachment.namespace)
            continue
        if attachment.deleting:
            continue
        address = next(free, None)
        if address is None:
            refused[key] = Refusal(
                ADDRESSES_EXHAUSTED,
                f"VMNetwork {name}: no free address left in {spec.subnet} "
                f"({len(taken)} in use); the cluster admin may create a larger network",
            )
            continue
        kept[key] = address
        taken.add(address)
    records = sorted(
        (_record(wanted[key], address) for key, address in kept.items()),
        key=lambda r: ipaddress.IPv4Address(r.address),
    )
    return Allocation(
        addresses=tuple(records),
        refused=refused,
        dhcp_address=str(reserved.dhcp) if spec.dhcp_enabled else None,
    )


def _not_allowed(network: str, namespace: str) -> Refusal:
    return Refusal(
        NETWORK_NOT_ALLOWED,
        f"VMNetwork {network} does not allow VMs of namespace {namespace}; the cluster "
        "admin adds the namespace to its spec.namespaces",
    )


@dataclass(frozen=True)
class NetworkState:
    """What placement reads from one VMNetwork (the controller's cached view)."""

    spec: VMNetworkSpec | None
    vni: int | None
    deleting: bool
    #: The network's Ready condition says why it is not usable (None when it is).
    not_ready: str | None
    #: (uid, interface) → address, from status.addresses.
    addresses: Mapping[tuple[str, str], str]
    #: (uid, interface) → refusal, from the controller's last allocation.
    refused: Mapping[tuple[str, str], Refusal]


def attachment_hold(
    network_name: str, state: NetworkState | None, attachment: Attachment
) -> Unschedulable | None:
    """Why ``attachment`` keeps its VM from being placed, or None when it is ready.

    Ready means: the network exists, allows the namespace, has a VNI, and (with a subnet)
    the interface's address is in the network's status — so the agent can read it
    before it starts the VM.
    """
    where = f"interface {attachment.interface}"
    if state is None:
        return Unschedulable(
            NETWORK_NOT_FOUND,
            f"{where}: VMNetwork {network_name} does not exist; the VM is placed once it does",
        )
    if state.deleting:
        return Unschedulable(
            NETWORK_NOT_FOUND, f"{where}: VMNetwork {network_name} is being deleted"
        )
    if state.spec is None or state.not_ready is not None:
        why = state.not_ready or "its spec cannot be read"
        return Unschedulable(
            NETWORK_NOT_READY, f"{where}: VMNetwork {network_name} is not ready: {why}"
        )
    has_address = attachment.key in state.addresses
    refusal = (
        _not_allowed(network_name, attachment.namespace)
        if not state.spec.allows(attachment.namespace)
        else state.refused.get(attachment.key)
    )
    if refusal is not None and (refusal.reason == NETWORK_NOT_ALLOWED or not has_address):
        return Unschedulable(refusal.reason, f"{where}: {refusal.message}")
    if state.vni is None or (state.spec.subnet is not None and not has_address):
        missing = "VNI" if state.vni is None else "address"
        return Unschedulable(
            WAITING_FOR_NETWORK,
            f"{where}: waiting for VMNetwork {network_name} to assign its {missing}",
        )
    return None


def network_status(
    stored: Mapping[str, Any],
    generation: int,
    *,
    vni: int | None,
    problem: tuple[str, str] | None,
    allocation: Allocation,
    deleting: bool,
    now: str | None = None,
) -> dict[str, Any]:
    """The whole wanted status of one VMNetwork (the caller writes only the difference).

    ``problem`` is ``(reason, message)`` when the network cannot be used (a VNI conflict,
    a spec that cannot work): ``Ready=False`` and ``Stalled``. Messages are stable (no
    counts that move), so an unchanged decision writes nothing.
    """
    if problem is not None:
        ready = (ConditionStatus.FALSE, *problem)
        reconciling, stalled = None, problem
    elif deleting:
        why = (
            WAITING_FOR_DETACH,
            "deleted; kept until no VirtualMachine names it (see status.addresses)",
        )
        ready, reconciling, stalled = (ConditionStatus.FALSE, *why), why, None
    elif vni is None:
        why = ("AssigningVni", "waiting for a VNI")
        ready, reconciling, stalled = (ConditionStatus.FALSE, *why), why, None
    else:
        ready, reconciling, stalled = (ConditionStatus.TRUE, VNI_ASSIGNED, f"VNI {vni}"), None, None
    conditions = kstatus_conditions(
        read_conditions(stored),
        generation,
        ready=ready,
        reconciling=reconciling,
        stalled=stalled,
        now=now,
    )
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "vni": vni,
        "dhcpAddress": allocation.dhcp_address,
        "addresses": [a.to_wire() for a in allocation.addresses],
        "allocatedCount": len(allocation.addresses),
        "conditions": write_conditions(conditions),
    }
    return {k: v for k, v in status.items() if v is not None}
