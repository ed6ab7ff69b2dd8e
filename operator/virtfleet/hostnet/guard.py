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
  (the VMHosts'): only nodes speak on the segments. Other VNIs (a CNI's) pass.
* NAT gateways (``vfgw*``, :mod:`virtfleet.hostnet.gateway`) reach the world through the
  node, not the node: nothing from them is input; they do not reach each other (one
  network's VMs into another's gateway) nor the other nodes' tunnel addresses (their
  agents, libvirtds and kubelets); nothing new is forwarded into them. What leaves is
  masqueraded behind the node's own address (only their uplink range: nobody else's
  traffic is touched).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from typing import Final

from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.netmodel import BRIDGE_PREFIX, GATEWAY_PORT_PREFIX, UPLINK_RANGE, VXLAN_UDP_PORT

__all__ = ["TABLE", "ensure_guard", "guard_ruleset"]

TABLE: Final = "virtfleet_vmnetworks"
FAMILIES: Final = ("inet", "arp", "ip")


def guard_ruleset(peers: Iterable[str] = (), vnis: Iterable[int] = ()) -> str:
    """``nft -f`` input that (re)makes the three tables (idempotent)."""
    bridges = f'    iifname "{BRIDGE_PREFIX}*" counter drop\n'
    gateways = f'    iifname "{GATEWAY_PORT_PREFIX}*" counter drop\n'
    vxlan = ""
    ours = ", ".join(str(v) for v in sorted(set(vnis)))
    nodes = ", ".join(sorted(set(peers)))
    if ours:
        others = f"ip saddr != {{ {nodes} }} " if nodes else ""
        vxlan = f"    udp dport {VXLAN_UDP_PORT} @th,96,24 {{ {ours} }} {others}counter drop\n"
    head = "  chain input {\n    type filter hook input priority filter - 5; policy accept;\n"
    to_nodes = f'    iifname "{GATEWAY_PORT_PREFIX}*" ip daddr {{ {nodes} }} counter drop\n'
    forward = (
        "  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n"
        f'    iifname "{GATEWAY_PORT_PREFIX}*" oifname "{GATEWAY_PORT_PREFIX}*" counter drop\n'
        + (to_nodes if nodes else "")
        + f'    oifname "{GATEWAY_PORT_PREFIX}*" ct state != {{ established, related }} '
        "counter drop\n  }\n"
    )
    masquerade = (
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    iifname "{GATEWAY_PORT_PREFIX}*" ip saddr {UPLINK_RANGE} '
        f'oifname != "{GATEWAY_PORT_PREFIX}*" masquerade\n  }}\n'
    )
    tables = {
        "inet": f"{head}{bridges}{gateways}{vxlan}  }}\n{forward}",
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
    force: bool = False,
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
        [*nft, "-f", "-"], input=guard_ruleset(peers, vnis), capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise HostNetworkError(f"nft refused the VMNetwork guard: {result.stderr.strip()[-300:]}")
    return True
