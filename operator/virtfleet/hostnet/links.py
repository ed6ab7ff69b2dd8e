"""Bridges, VXLANs, ports and flood entries over netlink (pyroute2's IPRoute).

Reads every link of the namespace into :class:`~virtfleet.netmodel.ObservedLink` and
carries out the link actions. Each action is written to converge from any start (create
if missing, else set), because the planner sees the state before a pass and a pass may
have been cut short.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Final

from pyroute2.netlink.exceptions import NetlinkError

from virtfleet.logs import get_logger
from virtfleet.netmodel import (
    VXLAN_UDP_PORT,
    EnsureBridge,
    EnsurePort,
    EnsureVxlan,
    ObservedLink,
    SetFloodPeers,
    bridge_name,
    vni_of,
    vxlan_name,
)

_log = get_logger("virtfleet.hostnet.links")

_IFF_UP: Final = 0x1
_ZERO_MAC: Final = "00:00:00:00:00:00"
_ADDR_GEN_MODE_NONE: Final = 1
#: No IPv6 link-local address: VMs must not reach the node over a segment, and our ports
#: must not send router solicitations and MLD reports into it.
NO_LINK_LOCAL: Final = {
    "attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _ADDR_GEN_MODE_NONE)]})]
}


def observe_links(ipr: Any) -> dict[str, ObservedLink]:
    """Every link of the namespace by name."""
    raw = list(ipr.get_links())
    names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in raw}
    return {link.name: link for link in (_link(msg, names) for msg in raw)}


def observe_flood(ipr: Any, links: dict[str, ObservedLink]) -> dict[str, frozenset[str]]:
    """Each of our VXLANs' all-zeros FDB destinations (learned entries are not ours)."""
    flood: dict[str, frozenset[str]] = {}
    for name, link in links.items():
        if link.kind != "vxlan" or vni_of(name) is None:
            continue
        index = _index(ipr, name)
        peers = set()
        for entry in ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=index):
            if entry.get_attr("NDA_LLADDR") == _ZERO_MAC and entry.get_attr("NDA_DST"):
                peers.add(str(entry.get_attr("NDA_DST")))
        flood[name] = frozenset(peers)
    return flood


def ensure_bridge(ipr: Any, action: EnsureBridge) -> None:
    name = bridge_name(action.vni)
    if action.replace:
        delete_link(ipr, name)
    settings = {"br_stp_state": 0, "br_forward_delay": 0}
    if not ipr.link_lookup(ifname=name):
        ipr.link("add", ifname=name, kind="bridge", mtu=action.mtu, **settings)
    index = _index(ipr, name)
    # Before up: the kernel makes the link-local address when the link comes up.
    ipr.link("set", index=index, IFLA_AF_SPEC=NO_LINK_LOCAL)
    ipr.link("set", index=index, kind="bridge", **settings)
    # An MTU set by hand stays: the bridge no longer follows its smallest port.
    ipr.link("set", index=index, mtu=action.mtu, state="up")


def ensure_vxlan(ipr: Any, action: EnsureVxlan) -> None:
    name = vxlan_name(action.vni)
    if action.recreate:
        delete_link(ipr, name)
    if not ipr.link_lookup(ifname=name):
        ipr.link(
            "add",
            ifname=name,
            kind="vxlan",
            vxlan_id=action.vni,
            vxlan_local=action.local,
            vxlan_port=VXLAN_UDP_PORT,
            # After a live migration the guest's announce frames, flooded to every peer,
            # move its MAC to the new node's address.
            vxlan_learning=1,
            mtu=action.mtu,
        )
    index = _index(ipr, name)
    ipr.link("set", index=index, IFLA_AF_SPEC=NO_LINK_LOCAL)
    ipr.link("set", index=index, mtu=action.mtu, state="up")


def ensure_port(ipr: Any, action: EnsurePort) -> None:
    index = _index(ipr, action.ifname)
    master = _index(ipr, bridge_name(action.vni))
    ipr.link("set", index=index, master=master)
    # Isolated ports reach only non-isolated ones: the VXLAN and the DHCP server talk to
    # this node's VMs, never to each other, so each node's server keeps to its own VMs.
    ipr.brport("set", index=index, isolated=int(action.isolated))
    ipr.link("set", index=index, state="up")


def set_flood_peers(ipr: Any, action: SetFloodPeers) -> None:
    index = _index(ipr, vxlan_name(action.vni))
    for peer in action.add:
        try:
            # pyroute2's default state is a static entry (NUD_NOARP | NUD_PERMANENT).
            ipr.fdb("append", ifindex=index, lladdr=_ZERO_MAC, dst=peer)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            _log.info("flood entry already there", vni=action.vni, peer=peer)
    for peer in action.remove:
        try:
            ipr.fdb("del", ifindex=index, lladdr=_ZERO_MAC, dst=peer)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise
            _log.info("flood entry already gone", vni=action.vni, peer=peer)


def delete_link(ipr: Any, name: str) -> bool:
    """Delete ``name`` if it exists; whether it did."""
    found = ipr.link_lookup(ifname=name)
    if not found:
        return False
    try:
        ipr.link("del", index=found[0])
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
        _log.info("link vanished before it was deleted", link=name)
        return False
    return True


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetlinkError(errno.ENODEV, f"no link named {name}")
    return int(found[0])


def _link(msg: Any, names: dict[int, str]) -> ObservedLink:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
    data = info.get_attr("IFLA_INFO_DATA") if info else None
    port = info.get_attr("IFLA_INFO_SLAVE_DATA") if info else None
    master = msg.get_attr("IFLA_MASTER")
    fields: dict[str, Any] = {}
    if kind == "vxlan" and data is not None:
        fields = {
            "vni": data.get_attr("IFLA_VXLAN_ID"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL"),
            "udp_port": data.get_attr("IFLA_VXLAN_PORT"),
            "learning": bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        }
    elif kind == "bridge" and data is not None:
        fields = {
            "stp": bool(data.get_attr("IFLA_BR_STP_STATE")),
            "forward_delay": data.get_attr("IFLA_BR_FORWARD_DELAY"),
        }
    return ObservedLink(
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mtu=msg.get_attr("IFLA_MTU"),
        up=bool(msg["flags"] & _IFF_UP),
        master=names.get(master) if master else None,
        isolated=bool(port.get_attr("IFLA_BRPORT_ISOLATED")) if port is not None else False,
        ipv6_link_local=_ipv6_link_local(msg),
        alias=msg.get_attr("IFLA_IFALIAS") or "",
        **fields,
    )


def _ipv6_link_local(msg: Any) -> bool:
    spec = msg.get_attr("IFLA_AF_SPEC")
    inet6 = spec.get_attr("AF_INET6") if spec is not None else None
    if inet6 is None:
        return False  # IPv6 off in the kernel: no address either way
    return bool(inet6.get_attr("IFLA_INET6_ADDR_GEN_MODE") != _ADDR_GEN_MODE_NONE)
