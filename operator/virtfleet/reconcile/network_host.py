"""What a node should change about its VMNetwork plumbing, decided without doing anything.

``plan(desired, observed)`` is to networks what :func:`virtfleet.reconcile.vm.decide` is
to VMs: a pure function from the networks this node should realise (those its VMs are
on) and what the adapter saw (:mod:`virtfleet.hostnet`) to typed actions. The agent
applies them, observes again and plans again; nothing left to do means converged. So
every step is idempotent, and a crash between two actions only leaves work for the
next pass.

Drift: an action that restores something virtfleet had made — a bridge, VXLAN or DHCP
port deleted, a tap detached, dnsmasq killed — says so (``drift=True``) for the
agent's "NetworkRepaired" Event. A network counts as made once any of its links or its
DHCP state is on the node; wiped entirely, it is simply made again.

The vocabulary (desired, observed, actions) is :mod:`virtfleet.netmodel`, re-exported
here; dnsmasq's files are rendered by :mod:`.network_dhcp`.
"""

from __future__ import annotations

from collections.abc import Iterable

from virtfleet.netmodel import (
    VXLAN_UDP_PORT,
    DhcpConfig,
    EnsureBridge,
    EnsurePort,
    EnsureVxlan,
    Lease,
    LocalNetwork,
    NetworkAction,
    ObservedDhcp,
    ObservedHost,
    ObservedLink,
    PlugGateway,
    ReloadDhcp,
    RemoveNetwork,
    SetFloodPeers,
    StartDhcp,
    StopDhcp,
    bridge_name,
    dhcp_port_name,
    fingerprint,
    gateway_done_alias,
    gateway_port_name,
    read_fingerprint,
    vni_of,
    vxlan_name,
)
from virtfleet.reconcile.network_dhcp import dnsmasq_config, dnsmasq_hosts

__all__ = [
    "DhcpConfig",
    "EnsureBridge",
    "EnsurePort",
    "EnsureVxlan",
    "Lease",
    "LocalNetwork",
    "NetworkAction",
    "ObservedDhcp",
    "ObservedHost",
    "ObservedLink",
    "PlugGateway",
    "ReloadDhcp",
    "RemoveNetwork",
    "SetFloodPeers",
    "StartDhcp",
    "StopDhcp",
    "plan",
    "repairs",
]


def plan(desired: Iterable[LocalNetwork], observed: ObservedHost) -> list[NetworkAction]:
    """The actions that take the node from ``observed`` to ``desired``, in order.

    Networks that are gone go first (their VNI may be reused by a new one), then each
    desired network by VNI: bridge, VXLAN, its port, flood entries, DHCP, taps.
    """
    networks = sorted(desired, key=lambda network: network.vni)
    vnis = [network.vni for network in networks]
    if len(set(vnis)) != len(vnis):
        raise ValueError(f"two desired networks share a VNI: {vnis}")
    actions: list[NetworkAction] = list(_removals(set(vnis), observed))
    for network in networks:
        actions.extend(_network(network, observed))
    return actions


def repairs(actions: Iterable[NetworkAction]) -> list[NetworkAction]:
    """The actions that repair drift: what the agent reports as NetworkRepaired."""
    return [action for action in actions if action.drift]


def _removals(wanted: set[int], observed: ObservedHost) -> Iterable[RemoveNetwork]:
    ours: dict[int, list[str]] = {}
    for name in observed.links:
        vni = vni_of(name)
        if vni is not None:
            ours.setdefault(vni, []).append(name)
    for vni in observed.dhcp:
        ours.setdefault(vni, [])
    for vni in sorted(set(ours) - wanted):
        yield RemoveNetwork(
            vni=vni,
            links=tuple(sorted(ours[vni])),
            dhcp=vni in observed.dhcp,
            reason=f"no VM of this node is on the network of VNI {vni} any more",
        )


def _network(network: LocalNetwork, observed: ObservedHost) -> list[NetworkAction]:
    links = observed.links
    names = (bridge_name(network.vni), vxlan_name(network.vni), dhcp_port_name(network.vni))
    made = any(name in links for name in names) or network.vni in observed.dhcp
    actions: list[NetworkAction] = []
    bridge = links.get(names[0])
    new_bridge = bridge is None or bridge.kind != "bridge"
    bridge_action = _bridge(network, bridge, made)
    if bridge_action is not None:
        actions.append(bridge_action)
    actions.extend(_vxlan(network, links.get(names[1]), observed, made, new_bridge=new_bridge))
    actions.extend(_dhcp(network, observed, made, new_bridge=new_bridge))
    for tap in network.taps:
        link = links.get(tap)
        if link is None:
            continue  # its VM is not running here (yet): libvirt makes and attaches it
        if new_bridge or link.master != names[0] or link.isolated:
            actions.append(
                EnsurePort(
                    network.name,
                    network.vni,
                    tap,
                    isolated=False,
                    drift=not new_bridge,
                    reason=_port_reason(link, names[0], isolated=False, new_bridge=new_bridge),
                )
            )
    return actions


def _bridge(network: LocalNetwork, link: ObservedLink | None, made: bool) -> EnsureBridge | None:
    name = bridge_name(network.vni)
    if link is None or link.kind != "bridge":
        what = "missing" if link is None else f"a {link.kind or 'plain'} link, not a bridge"
        return EnsureBridge(
            network.name,
            network.vni,
            network.mtu,
            replace=link is not None,
            drift=made,
            reason=f"bridge {name} was {what}",
        )
    drifted = [
        what
        for what, wrong in (
            ("down", not link.up),
            ("STP on", bool(link.stp)),
            (f"forward delay {link.forward_delay}", bool(link.forward_delay)),
            ("an IPv6 link-local address", link.ipv6_link_local),
        )
        if wrong
    ]
    if not drifted and link.mtu == network.mtu:
        return None
    changes = [f"MTU {link.mtu} → {network.mtu}"] if link.mtu != network.mtu else []
    return EnsureBridge(
        network.name,
        network.vni,
        network.mtu,
        drift=bool(drifted),
        reason=f"bridge {name}: " + ", ".join(drifted + changes),
    )


def _vxlan(
    network: LocalNetwork,
    link: ObservedLink | None,
    observed: ObservedHost,
    made: bool,
    *,
    new_bridge: bool,
) -> list[NetworkAction]:
    name = vxlan_name(network.vni)
    ensure = _ensure_vxlan(network, link, made)
    fresh = ensure is not None and (ensure.recreate or link is None)
    actions: list[NetworkAction] = [ensure] if ensure is not None else []
    if (
        fresh
        or new_bridge
        or link is None
        or link.master != bridge_name(network.vni)
        or not (link.isolated)
    ):
        actions.append(
            EnsurePort(
                network.name,
                network.vni,
                name,
                isolated=True,
                drift=not (fresh or new_bridge),
                reason=_port_reason(
                    link, bridge_name(network.vni), isolated=True, new_bridge=new_bridge or fresh
                ),
            )
        )
    have = frozenset() if fresh else observed.flood.get(name, frozenset())
    want = frozenset(network.peers) - {network.tunnel_address}
    add, remove = tuple(sorted(want - have)), tuple(sorted(have - want))
    if add or remove:
        changes = [f"+{peer}" for peer in add] + [f"-{peer}" for peer in remove]
        actions.append(
            SetFloodPeers(
                network.name, network.vni, add, remove, reason=f"peers {' '.join(changes)}"
            )
        )
    return actions


def _ensure_vxlan(
    network: LocalNetwork, link: ObservedLink | None, made: bool
) -> EnsureVxlan | None:
    name = vxlan_name(network.vni)
    if link is None:
        return EnsureVxlan(
            network.name,
            network.vni,
            network.tunnel_address,
            network.mtu,
            drift=made,
            reason=f"vxlan {name} was missing",
        )
    foreign = [
        what
        for what, wrong in (
            (f"a {link.kind or 'plain'} link", link.kind != "vxlan"),
            (f"VNI {link.vni}", link.kind == "vxlan" and link.vni != network.vni),
            (f"port {link.udp_port}", link.kind == "vxlan" and link.udp_port != VXLAN_UDP_PORT),
            ("learning off", link.kind == "vxlan" and not link.learning),
        )
        if wrong
    ]
    moved = link.kind == "vxlan" and link.local != network.tunnel_address
    if foreign or moved:
        changes = [f"local {link.local} → {network.tunnel_address}"] if moved else []
        return EnsureVxlan(
            network.name,
            network.vni,
            network.tunnel_address,
            network.mtu,
            recreate=True,
            drift=bool(foreign),
            reason=f"vxlan {name}: " + ", ".join(foreign + changes),
        )
    drifted = [
        what
        for what, wrong in (
            ("down", not link.up),
            ("an IPv6 link-local address", link.ipv6_link_local),
        )
        if wrong
    ]
    if not drifted and link.mtu == network.mtu:
        return None
    changes = [f"MTU {link.mtu} → {network.mtu}"] if link.mtu != network.mtu else []
    return EnsureVxlan(
        network.name,
        network.vni,
        network.tunnel_address,
        network.mtu,
        drift=bool(drifted),
        reason=f"vxlan {name}: " + ", ".join(drifted + changes),
    )


def _dhcp(
    network: LocalNetwork, observed: ObservedHost, made: bool, *, new_bridge: bool
) -> list[NetworkAction]:
    port_name = dhcp_port_name(network.vni)
    port = observed.links.get(port_name)
    state = observed.dhcp.get(network.vni)
    if network.dhcp is None:
        if state is None and port is None:
            return []
        return [StopDhcp(network.name, network.vni, reason="the network has no DHCP any more")]
    config = dnsmasq_config(network)
    hosts = dnsmasq_hosts(network.dhcp)
    start = _start_dhcp(network, state, port, config)
    actions: list[NetworkAction] = []
    if start is not None:
        actions.append(
            StartDhcp(
                network.name,
                network.vni,
                network.dhcp.address,
                network.dhcp.prefix_length,
                network.mtu,
                config,
                hosts,
                fingerprint(hosts),
                nat=network.dhcp.nat,
                restart=start[0],
                drift=start[1],
                reason=start[2],
            )
        )
    elif state is not None and state.hosts_fingerprint != fingerprint(hosts):
        actions.append(
            ReloadDhcp(
                network.name,
                network.vni,
                hosts,
                fingerprint(hosts),
                reason=f"{len(network.dhcp.leases)} leases",
            )
        )
    fresh = start is not None
    if (
        fresh
        or new_bridge
        or port is None
        or port.master != bridge_name(network.vni)
        or not (port.isolated and port.up)
    ):
        actions.append(
            EnsurePort(
                network.name,
                network.vni,
                port_name,
                isolated=True,
                drift=not (fresh or new_bridge),
                reason=_port_reason(
                    port, bridge_name(network.vni), isolated=True, new_bridge=new_bridge or fresh
                ),
            )
        )
    actions.extend(_gateway(network, observed, started=fresh))
    return actions


def _gateway(network: LocalNetwork, observed: ObservedHost, *, started: bool) -> list[PlugGateway]:
    """The NAT gateway, after a (re)started dnsmasq, or when its uplink is gone or down
    (made last, so a pass cut short leaves it down: a repair). Its own action: a gateway
    that cannot be made leaves DHCP serving."""
    if network.dhcp is None or network.dhcp.nat is None:
        return []
    name = gateway_port_name(network.vni)
    uplink = observed.links.get(name)
    if started:
        drift, reason = False, "NAT gateway of a (re)started DHCP namespace"
    elif uplink is None or uplink.kind != "veth" or not uplink.up:
        drift, reason = True, f"the NAT gateway's uplink {name} was missing or down"
    elif uplink.alias != gateway_done_alias(network.dhcp.nat):
        # Made by a pass cut short, or for another uplink address (a lower VNI took it).
        drift, reason = False, f"the NAT gateway behind {name} was unfinished or outdated"
    else:
        return []
    return [
        PlugGateway(
            network.name,
            network.vni,
            network.mtu,
            network.dhcp.prefix_length,
            network.dhcp.nat,
            drift=drift,
            reason=reason,
        )
    ]


def _start_dhcp(
    network: LocalNetwork,
    state: ObservedDhcp | None,
    port: ObservedLink | None,
    config: str,
) -> tuple[bool, bool, str] | None:
    """(restart, drift, reason) when dnsmasq must be (re)started, else None."""
    if state is None:
        return False, False, "DHCP server started"
    if state.pid is None:  # it had state here: it died or was killed
        return False, True, "the DHCP server was not running"
    if state.config_fingerprint != read_fingerprint(config):
        return True, False, "the DHCP configuration changed"
    if port is None or port.kind != "veth":
        # Its veth is its only interface: without it dnsmasq serves nobody.
        return True, True, f"the DHCP server's port {dhcp_port_name(network.vni)} was missing"
    return None


def _port_reason(
    link: ObservedLink | None, bridge: str, *, isolated: bool, new_bridge: bool
) -> str:
    if link is None or new_bridge:
        return f"port of {bridge}"
    name = link.name
    if link.master != bridge:
        where = "detached" if link.master is None else f"attached to {link.master}"
        return f"{name} was {where}; attached to {bridge}"
    if link.isolated != isolated:
        return f"{name} was {'not ' if isolated else ''}isolated"
    return f"{name} was down"
