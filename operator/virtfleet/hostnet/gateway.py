"""A VMNetwork's NAT gateway on one node, in the namespace of the network's dnsmasq.

Inside that namespace ``eth0`` (an isolated port of the network's bridge, so it talks
to this node's VMs only) also carries the gateway address with a MAC derived from the
VNI: every node answers as the same gateway, and a guest migrated to another node keeps
its ARP entry and its route. ``up0`` leads to the node (``vfgw<vni>`` there) with an
uplink address of its own; both ends know each other's MAC statically, so no ARP crosses
the uplink and the node needs no address on it. The namespace forwards eth0 → up0 only
(replies back), masquerades behind its uplink address, and accepts nothing new from the
node's side. The node masquerades once more, behind its own address, and its guard keeps
the gateways off the node and the other nodes (:mod:`virtfleet.hostnet.guard`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Final

from virtfleet.hostnet.devconf import set_forwarding
from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.hostnet.guard import nft_binary
from virtfleet.hostnet.links import NO_LINK_LOCAL, delete_link
from virtfleet.hostnet.netns import entered, iproute
from virtfleet.logs import get_logger
from virtfleet.netmodel import (
    UPLINK_NEXT_HOP,
    PlugGateway,
    gateway_done_alias,
    gateway_mac,
    gateway_port_name,
    uplink_inside_mac,
    uplink_mac,
)

__all__ = ["enable_forwarding", "plug_in_gateway", "set_gateway_mac"]

_log = get_logger("virtfleet.hostnet.gateway")

#: The gateway's end of the uplink, inside the namespace.
UPLINK_INSIDE: Final = "up0"
_NUD_PERMANENT: Final = 0x80
_RTNH_F_ONLINK: Final = 4
_SCOPE_LINK: Final = 253
_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


def namespace_rules() -> str:
    """``nft -f`` input for the gateway's namespace (idempotent: remade each time)."""
    return (
        "table ip virtfleet_gateway\ndelete table ip virtfleet_gateway\n"
        "table ip virtfleet_gateway {\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy drop;\n"
        f'    iifname "eth0" oifname "{UPLINK_INSIDE}" accept\n'
        f'    iifname "{UPLINK_INSIDE}" oifname "eth0" ct state established,related accept\n'
        "  }\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    iifname "{UPLINK_INSIDE}" ct state != {{ established, related }} drop\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{UPLINK_INSIDE}" masquerade\n'
        "  }\n"
        "}\n"
    )


def set_gateway_mac(inside: Any, eth0: int, vni: int) -> None:
    """Before ``eth0`` is up: the gateway's MAC, the same on every node."""
    inside.link("set", index=eth0, address=gateway_mac(vni))


def plug_in_gateway(ipr: Any, pid: int, action: PlugGateway) -> None:
    """The gateway address and the uplink, in the namespace of process ``pid``.

    Made from scratch (the old uplink goes first, and with it its routes and neighbour
    entries on both ends); the last step writes the uplink's alias
    (:func:`~virtfleet.netmodel.gateway_done_alias`): a gateway without it is remade.
    ``eth0`` there already has the gateway's MAC and the DHCP address (which stays its
    first, so dnsmasq keeps it as its server identifier).
    """
    nat, vni = action.nat, action.vni
    port = gateway_port_name(vni)
    delete_link(ipr, port)
    netns = f"/proc/{pid}/ns/net"
    inside_mac = uplink_inside_mac(vni)
    fd = os.open(netns, os.O_RDONLY)
    try:
        peer = {"ifname": UPLINK_INSIDE, "net_ns_fd": fd, "mtu": action.mtu, "address": inside_mac}
        ipr.link(
            "add", ifname=port, kind="veth", mtu=action.mtu, address=uplink_mac(vni), peer=peer
        )
    finally:
        os.close(fd)
    index = ipr.link_lookup(ifname=port)[0]
    ipr.link("set", index=index, IFLA_AF_SPEC=NO_LINK_LOCAL)
    with iproute(netns) as inside:
        eth0 = inside.link_lookup(ifname="eth0")[0]
        inside.addr("replace", index=eth0, address=nat.address, prefixlen=action.prefix_length)
        up0 = inside.link_lookup(ifname=UPLINK_INSIDE)[0]
        inside.link("set", index=up0, IFLA_AF_SPEC=NO_LINK_LOCAL)
        inside.addr("add", index=up0, address=nat.uplink, prefixlen=32)
        inside.link("set", index=up0, state="up")
        inside.neigh(
            "replace",
            dst=UPLINK_NEXT_HOP,
            lladdr=uplink_mac(vni),
            ifindex=up0,
            state=_NUD_PERMANENT,
        )
        inside.route("replace", dst="0.0.0.0/0", gateway=UPLINK_NEXT_HOP, oif=up0,
                     flags=_RTNH_F_ONLINK)  # fmt: skip
    for ifname in ("eth0", UPLINK_INSIDE):
        set_forwarding(netns, ifname)
    _run_in(netns, [nft_binary(), "-f", "-"], stdin=namespace_rules())
    ipr.link("set", index=index, state="up")
    # Another network may still route this address (it moves on its next pass, when a
    # lower VNI took its slot): "replace" takes it over rather than failing for good.
    ipr.route("replace", dst=nat.uplink, dst_len=32, oif=index, scope=_SCOPE_LINK)
    ipr.neigh("replace", dst=nat.uplink, lladdr=inside_mac, ifindex=index, state=_NUD_PERMANENT)
    ipr.link("set", index=index, ifalias=gateway_done_alias(nat))  # finished


def enable_forwarding(netns: str | None) -> bool:
    """IPv4 forwarding on the node (its gateways' traffic leaves through it, the replies
    come back through its own interfaces); True when it had been off. Kubernetes nodes
    forward already: their CNI needs it too."""
    with entered(netns):
        if _FORWARDING.read_text().strip() == "1":
            return False
        try:
            _FORWARDING.write_text("1\n")
        except OSError as exc:  # /proc/sys is read-only in an unprivileged container
            raise HostNetworkError(
                "IPv4 forwarding is off on this node and the agent cannot turn it on "
                f"({exc.strerror}): run sysctl -w net.ipv4.ip_forward=1 on the node (as a "
                "Kubernetes CNI needs anyway) for VMNetwork NAT"
            ) from exc
    _log.warning("IPv4 forwarding was off on the node; turned on for VMNetwork NAT")
    return True


def _run_in(netns: str, command: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(
        ["nsenter", f"--net={netns}", "--", *command],
        input=stdin, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise HostNetworkError(f"{' '.join(command[:3])}: {result.stderr.strip()[-300:]}")
    return result.stdout
