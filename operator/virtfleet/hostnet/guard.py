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
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from typing import Final

from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.netmodel import BRIDGE_PREFIX, VXLAN_UDP_PORT

__all__ = ["TABLE", "ensure_guard", "guard_ruleset"]

TABLE: Final = "virtfleet_vmnetworks"


def guard_ruleset(peers: Iterable[str] = (), vnis: Iterable[int] = ()) -> str:
    """``nft -f`` input that (re)makes both tables (idempotent)."""
    bridges = f'    iifname "{BRIDGE_PREFIX}*" counter drop\n'
    vxlan = ""
    ours = ", ".join(str(v) for v in sorted(set(vnis)))
    if ours:
        nodes = ", ".join(sorted(set(peers)))
        others = f"ip saddr != {{ {nodes} }} " if nodes else ""
        vxlan = f"    udp dport {VXLAN_UDP_PORT} @th,96,24 {{ {ours} }} {others}counter drop\n"
    head = "  chain input {\n    type filter hook input priority filter - 5; policy accept;\n"
    chains = {"inet": f"{head}{bridges}{vxlan}  }}\n", "arp": f"{head}{bridges}  }}\n"}
    return "".join(
        f"table {family} {TABLE}\ndelete table {family} {TABLE}\n"
        f"table {family} {TABLE} {{\n{chain}}}\n"
        for family, chain in chains.items()
    )


def _nft() -> str:
    found = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if found is None:
        raise HostNetworkError("nft is not installed (Debian package nftables)")
    return found


def ensure_guard(
    netns: str | None = None, peers: Iterable[str] = (), vnis: Iterable[int] = (), *,
    force: bool = False,
) -> bool:  # fmt: skip
    """Make the tables unless both are there (in the namespace at path ``netns``, None:
    this process's), or always with ``force`` (peers or VNIs changed); True when made."""
    nft = [_nft()] if netns is None else ["nsenter", f"--net={netns}", "--", _nft()]
    present = subprocess.run(
        [*nft, "list", "tables"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    if not force and f"table inet {TABLE}" in present and f"table arp {TABLE}" in present:
        return False
    result = subprocess.run(
        [*nft, "-f", "-"], input=guard_ruleset(peers, vnis), capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise HostNetworkError(f"nft refused the VMNetwork guard: {result.stderr.strip()[-300:]}")
    return True
