"""The node keeps to itself, and its VMNetworks to their nodes.

* A VMNetwork's bridge has no address, but it is still an interface of the node: Linux
  answers ARP there for the node's other addresses (``arp_ignore`` 0) and takes IP
  packets sent to the bridge's MAC — a guest with an on-link route would reach the
  node's libvirtd. The guard drops, on the input hook, whatever arrives through one of
  our bridges (``vfbr*``), IP and ARP alike; frames between the bridge's ports (the VMs,
  the VXLAN, the DHCP server's veth) are bridged, never input, and pass.
* VXLAN has no authentication: anybody who can send UDP to the node's port 4789 could
  put frames into a VMNetwork (and, the VXLAN learning, steal a VM's unicast). The guard
  drops VXLAN packets of our VNIs whose source is not another node's tunnel address
  (the VMHosts'), or whose destination is not this node's own: only nodes speak on the
  segments, on their tunnel addresses. Other VNIs (a CNI's) pass.
* Nothing is *routed* off a bridge either (with br_netfilter, a kube-proxy DNAT can turn
  a bridged frame into a routed packet that would leave with the VM's address).
* NAT gateways (``vfgw*``, :mod:`virtfleet.hostnet.gateway`) reach the world through the
  node, not the node nor the cluster: nothing from them is input; they do not reach each
  other (one network's VMs into another's gateway), the other nodes' tunnel addresses,
  link-local addresses (cloud metadata: the node's credentials), the ranges the admin
  denies (``--nat-deny-cidr``: the cluster's pod, Service and node networks), anything
  DNAT'd on the way (a NodePort, hostPort or Service) or any tunnel port (a VXLAN packet
  leaving as the node would be believed by the other nodes). Nothing new is forwarded
  into them. What leaves is masqueraded behind the node's own address (only their
  uplink range: nobody else's traffic is touched).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable
from typing import Final

from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.netmodel import BRIDGE_PREFIX, GATEWAY_PORT_PREFIX, UPLINK_RANGE, VXLAN_UDP_PORT

__all__ = ["TABLE", "ensure_guard", "guard_ruleset"]

TABLE: Final = "virtfleet_vmnetworks"
FAMILIES: Final = ("inet", "arp", "ip")


#: UDP ports of the tunnels a node may speak (VXLAN: IANA's and Linux's; Geneve): no VM
#: sends them out through a gateway, where they would leave as the node (and another
#: node's VXLAN accepts its peers).
TUNNEL_PORTS: Final = (VXLAN_UDP_PORT, 8472, 6081)
#: Never reached through a NAT gateway: link-local, where clouds serve the node's
#: metadata and credentials.
ALWAYS_DENIED: Final = ("169.254.0.0/16",)


def guard_ruleset(
    peers: Iterable[str] = (),
    vnis: Iterable[int] = (),
    local: str | None = None,
    nat_denied: Iterable[str] = (),
) -> str:
    """``nft -f`` input that (re)makes the three tables (idempotent). ``local``: this
    node's tunnel address (VXLAN of our VNIs to any other address of the node is
    dropped); ``nat_denied``: ranges the NAT gateways never reach (the cluster's)."""
    gw = f'iifname "{GATEWAY_PORT_PREFIX}*"'
    bridges = f'    iifname "{BRIDGE_PREFIX}*" counter drop\n'
    vxlan = ""
    ours = ", ".join(str(v) for v in sorted(set(vnis)))
    nodes = ", ".join(sorted(set(peers)))
    if ours:
        match = f"udp dport {VXLAN_UDP_PORT} @th,96,24 {{ {ours} }}"
        others = f"    {match} ip saddr != {{ {nodes} }} counter drop\n" if nodes else ""
        elsewhere = f"    {match} ip daddr != {local} counter drop\n" if local else ""
        vxlan = (others or f"    {match} counter drop\n") + elsewhere
    head = "  chain input {\n    type filter hook input priority filter - 5; policy accept;\n"
    # The gateways speak IPv4 only: an IPv6 range has nothing to deny here.
    ipv4 = {str(ipaddress.ip_network(c, strict=False)) for c in nat_denied if ":" not in c}
    denied = ", ".join(sorted({*ALWAYS_DENIED, *ipv4}))
    ports = ", ".join(str(p) for p in TUNNEL_PORTS)
    forward = (
        "  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n"
        # Routed off a segment (a DNAT of br_netfilter's on a bridged frame): never.
        # Bridged frames that br_netfilter shows this hook have the bridge as both ends.
        f'    iifname "{BRIDGE_PREFIX}*" oifname != "{BRIDGE_PREFIX}*" counter drop\n'
        f'    {gw} oifname "{GATEWAY_PORT_PREFIX}*" counter drop\n'
        f"    {gw} udp dport {{ {ports} }} counter drop\n"
        f"    {gw} ip daddr {{ {denied} }} counter drop\n"
        + (f"    {gw} ip daddr {{ {nodes} }} counter drop\n" if nodes else "")
        # DNAT'd on the way (a NodePort, a hostPort, a Service): the cluster, not out.
        + f"    {gw} ct status dnat counter drop\n"
        f'    oifname "{GATEWAY_PORT_PREFIX}*" ct state != {{ established, related }} '
        "counter drop\n  }\n"
    )
    masquerade = (
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    {gw} ip saddr {UPLINK_RANGE} "
        f'oifname != "{GATEWAY_PORT_PREFIX}*" masquerade\n  }}\n'
    )
    tables = {
        "inet": f"{head}{bridges}    {gw} counter drop\n{vxlan}  }}\n{forward}",
        "arp": f"{head}{bridges}  }}\n",
        "ip": masquerade,
    }
    return "".join(
        f"table {family} {TABLE}\ndelete table {family} {TABLE}\n"
        f"table {family} {TABLE} {{\n{chain}}}\n"
        for family, chain in tables.items()
    )


def nft_binary() -> str:
    found = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if found is None:
        raise HostNetworkError("nft is not installed (Debian package nftables)")
    return found


def ensure_guard(
    netns: str | None = None, peers: Iterable[str] = (), vnis: Iterable[int] = (), *,
    local: str | None = None, nat_denied: Iterable[str] = (), force: bool = False,
) -> bool:  # fmt: skip
    """Make the tables unless all are there (in the namespace at path ``netns``, None:
    this process's), or always with ``force`` (peers or VNIs changed); True when made."""
    nft = [nft_binary()] if netns is None else ["nsenter", f"--net={netns}", "--", nft_binary()]
    present = subprocess.run(
        [*nft, "list", "tables"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    if not force and all(f"table {family} {TABLE}" in present for family in FAMILIES):
        return False
    result = subprocess.run(
        [*nft, "-f", "-"], input=guard_ruleset(peers, vnis, local, nat_denied),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise HostNetworkError(f"nft refused the VMNetwork guard: {result.stderr.strip()[-300:]}")
    return True
