"""Where a VM should run: a pure function of the VM's request and the fleet's state.

Rules, in the order a node is checked (the first that fails names the node's reason):

1. the Node object exists and is not cordoned (``spec.unschedulable``);
2. it equals ``spec.nodeName`` when the VM is pinned (other nodes are not considered);
3. its labels match every ``spec.nodeSelector`` pair;
4. its agent is alive: a VMHost with ``Ready=True`` and a heartbeat fresher than the
   timeout, reporting ``memoryBytes``;
5. it has room: ``memoryBytes * overcommit`` minus the memory of the VMs already placed
   there (from the controller's own cache, so back-to-back placements see each other)
   is at least the VM's memory.

Among the nodes left, *spread*: the one with the most free memory after placement
wins, ties broken by name. When none is left the answer is :class:`Unschedulable`
with one reason per node; ``InsufficientCapacity`` (nothing will change without new
hardware, so the VM is ``Stalled``) when the VM is larger than the whole placeable
memory of every node it may use, ``Unschedulable`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from virtfleet.api.conditions import rfc3339
from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.reconcile.views import HostView, NodeView, VmRequest

UNSCHEDULABLE = "Unschedulable"
INSUFFICIENT_CAPACITY = "InsufficientCapacity"
#: The controller cannot read the VM's spec (the apiserver normally refuses such specs).
INVALID_SPEC = "InvalidSpec"
#: An explicit MAC another VM already uses (``controller.macs``).
MAC_ADDRESS_CONFLICT = "MacAddressConflict"
#: A ``type: network`` interface and its VMNetwork (``reconcile.network_ipam``): the network
#: does not exist (or is being deleted), does not allow the VM's namespace, has no address
#: left, or cannot be used (a VNI conflict); or the controller has yet to write its VNI or
#: the VM's addresses, which the agent reads before it starts the VM.
NETWORK_NOT_FOUND = "NetworkNotFound"
NETWORK_NOT_ALLOWED = "NetworkNotAllowed"
ADDRESSES_EXHAUSTED = "AddressesExhausted"
NETWORK_NOT_READY = "NetworkNotReady"
WAITING_FOR_NETWORK = "WaitingForNetwork"
#: Reasons that waiting will not fix: the VM is ``Stalled``.
STALLED_REASONS = frozenset(
    {
        INSUFFICIENT_CAPACITY,
        INVALID_SPEC,
        MAC_ADDRESS_CONFLICT,
        NETWORK_NOT_FOUND,
        NETWORK_NOT_ALLOWED,
        ADDRESSES_EXHAUSTED,
        NETWORK_NOT_READY,
    }
)


@dataclass(frozen=True)
class Placement:
    node: str
    #: Placeable memory left on the node once this VM is there.
    free_after_bytes: int


@dataclass(frozen=True)
class Unschedulable:
    reason: str  # Unschedulable, InsufficientCapacity, ... (the constants above)
    message: str

    @property
    def stalled(self) -> bool:
        """True when waiting will not help (kstatus ``Stalled``)."""
        return self.reason in STALLED_REASONS


def request_from_spec(spec: VirtualMachineSpec) -> VmRequest:
    return VmRequest(
        memory_bytes=spec.memory.size.bytes,
        memory_text=spec.memory.size.text,
        node_name=spec.node_name,
        node_selector=dict(spec.node_selector),
        needs_networks=any(nic.type == InterfaceType.NETWORK for nic in spec.interfaces),
    )


def place(
    vm: VmRequest | VirtualMachineSpec,
    vms_on_nodes: Mapping[str, int],
    hosts: Mapping[str, HostView],
    nodes: Mapping[str, NodeView],
    *,
    now: datetime,
    heartbeat_timeout: float,
    overcommit: float = 1.0,
) -> Placement | Unschedulable:
    """Choose a node for ``vm`` (see the module doc for the rules).

    ``vms_on_nodes`` maps a node name to the memory (bytes) of the VMs already placed
    there; ``hosts`` and ``nodes`` are the VMHosts and Nodes by name.
    """
    request = request_from_spec(vm) if isinstance(vm, VirtualMachineSpec) else vm
    need = request.memory_bytes
    names = [request.node_name] if request.node_name else sorted(set(nodes) | set(hosts))
    reasons: list[str] = []
    capacities: list[int] = []  # placeable memory of nodes the VM may use at all
    fits: list[Placement] = []
    for name in names:
        node = nodes.get(name)
        if node is None:
            reasons.append(f"{name}: no such Node")
            continue
        if node.unschedulable:
            reasons.append(f"{name}: cordoned")
            continue
        mismatch = [
            f"{k}={v}" for k, v in sorted(request.node_selector.items()) if node.labels.get(k) != v
        ]
        if mismatch:
            reasons.append(f"{name}: does not match nodeSelector {','.join(mismatch)}")
            continue
        host = hosts.get(name)
        if host is None:
            reasons.append(f"{name}: no VMHost (is the virtfleet agent running there?)")
            continue
        if host.memory_bytes is None:
            reasons.append(f"{name}: VMHost reports no memory yet")
            continue
        if request.needs_networks and not host.realises_networks:
            reasons.append(f"{name}: realises no VMNetworks (its agent has no --tunnel-address)")
            continue
        capacity = int(host.memory_bytes * overcommit)
        capacities.append(capacity)
        if not host.ready:
            reasons.append(f"{name}: agent not Ready ({host.ready_reason})")
            continue
        if not host.fresh(now, heartbeat_timeout):
            reasons.append(f"{name}: {stale_heartbeat(host)}")
            continue
        if host.placeable_after is not None and now < host.placeable_after:
            reasons.append(
                f"{name}: recovering from a node failure, no placements until "
                f"{rfc3339(host.placeable_after)}"
            )
            continue
        free = capacity - vms_on_nodes.get(name, 0)
        if capacity < need:
            reasons.append(
                f"{name}: {format_bytes(capacity)} total < {request.memory_text} requested"
            )
        elif free < need:
            reasons.append(f"{name}: {format_bytes(free)} free < {request.memory_text} requested")
        else:
            fits.append(Placement(node=name, free_after_bytes=free - need))
    if fits:
        return min(fits, key=lambda p: (-p.free_after_bytes, p.node))
    available = "no nodes" if not names else f"0/{len(names)} nodes are available"
    if request.node_name:
        available = f"pinned to {request.node_name}, which is not available"
    message = f"{available}: {'; '.join(reasons)}" if reasons else available
    if capacities and need > max(capacities):
        return Unschedulable(INSUFFICIENT_CAPACITY, message)
    return Unschedulable(UNSCHEDULABLE, message)


def stale_heartbeat(host: HostView) -> str:
    """A stable phrase (no "N seconds ago", so status does not change every pass)."""
    if host.fenced:
        return "node is fenced (its agent's Lease carries a fence mark)"
    if host.lease_seen is not None:
        return f"agent Lease not renewed since {rfc3339(host.lease_seen)}"
    if host.heartbeat is None:
        return "agent has not sent a heartbeat"
    return f"agent heartbeat stale since {rfc3339(host.heartbeat)}"


_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def format_bytes(value: int) -> str:
    """Binary units, one decimal at most, rounded down: ``1.2Gi``, ``512Mi``."""
    if value <= 0:
        return "0"
    if value < 1024:
        return f"{value}B"
    amount = float(value)
    index = 0
    while amount >= 1024 and index < len(_UNITS):
        amount /= 1024
        index += 1
    unit = _UNITS[index - 1]
    # Rounded down, so "3.9Gi free < 4Gi requested" never reads "4Gi free < 4Gi".
    text = f"{math.floor(amount * 10) / 10:.1f}".removesuffix(".0")
    return f"{text}{unit}"
