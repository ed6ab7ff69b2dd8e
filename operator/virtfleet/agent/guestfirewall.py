"""The nftables table that keeps user-mode NICs off the host they run on.

Why a firewall: a ``type: user`` NIC is QEMU's slirp, which turns the guest's
connections into connections *of the QEMU process*, and maps 10.0.2.2 to the host's
127.0.0.1. On libvirt 9.0 / QEMU 7.2 nothing closes that from the domain XML: QEMU does
not expose libslirp's ``disable_host_loopback``; ``restrict=on`` (all or nothing) and
passt's ``--no-map-gw`` cannot be set through libvirt (and libvirt 9.0 on Debian
bookworm refuses ``<backend type='passt'/>`` altogether, libvirt issue 462). What does
work, measured on this machine: reject *new* connections of QEMU's group (qemu.conf
``group``) to the host's own addresses (``fib daddr type local``: loopback and every
interface address) and to link-local ones. QEMU's replies on connections made to it
(a VNC client, an incoming migration) are not new and pass; a live migration's stream
is opened by libvirtd, not QEMU, and a storage copy's NBD connection goes to another
host — where nodes share a host (the e2e harness), its port range is an exception.

The table is the agent's, one per node name, replaced atomically on every apply (the
``table; delete table; table {...}`` idiom of ``nft -f``), and left in place when the
agent stops: the guests keep running and must stay fenced. With the admin's opt-in
(``NetworkPolicy.user_host_access``) the table is removed instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
import socket
import subprocess
from typing import Final

from virtfleet.agent.network import NetworkPolicy
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.logs import get_logger

__all__ = ["GUEST_FIREWALL_UNAVAILABLE", "GuestFirewall", "removal", "ruleset", "table_name"]

#: Reason of the condition of a VM with a user NIC while the table is not in place.
GUEST_FIREWALL_UNAVAILABLE: Final = "GuestFirewallUnavailable"

_TIMEOUT_S: Final = 30.0
_log = get_logger("virtfleet.agent.guestfirewall")


def table_name(node: str) -> str:
    """``virtfleet_<node>`` with what nft cannot take in a name replaced by ``_``."""
    return "virtfleet_" + re.sub(r"[^A-Za-z0-9_]", "_", node)


def _quoted(text: str) -> str:
    return '"' + re.sub(r"[^A-Za-z0-9 ._:,()/=-]", "_", text) + '"'


def ruleset(node: str, policy: NetworkPolicy) -> str:
    """The ``nft -f`` script that installs (or replaces) this node's table."""
    table = f"inet {table_name(node)}"
    nets = [ipaddress.ip_network(c, strict=False) for c in policy.user_nic_deny]
    deny4 = ", ".join(str(n) for n in nets if n.version == 4)
    deny6 = ", ".join(str(n) for n in nets if n.version == 6)
    rules = []
    if deny4:
        rules.append(f"ip daddr {{ {deny4} }} goto refuse")
    if deny6:
        rules.append(f"ip6 daddr {{ {deny6} }} goto refuse")
    if policy.user_nic_local_ports:
        ports = ", ".join(policy.user_nic_local_ports)
        local = "fib daddr type local meta l4proto { tcp, udp }"
        rules.append(f"{local} th dport {{ {ports} }} accept")
    rules.append("fib daddr type local goto refuse")
    comment = _quoted(
        f"virtfleet agent of node {node}: user NICs (QEMU, group {policy.qemu_gid}) "
        "may not reach this host"
    )
    body = "\n".join(f"\t\t{rule}" for rule in rules)
    return (
        f"table {table}\n"
        f"delete table {table}\n"
        f"table {table} {{\n"
        f"\tcomment {comment}\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        # untracked too: a ruleset that skips conntrack on loopback must not open a hole.
        f"\t\tmeta skgid {policy.qemu_gid} ct state {{ new, untracked }} jump user_nics\n"
        "\t}\n"
        "\tchain user_nics {\n"
        f"{body}\n"
        "\t}\n"
        "\tchain refuse {\n"
        "\t\tmeta l4proto tcp reject with tcp reset\n"
        "\t\treject with icmpx admin-prohibited\n"
        "\t}\n"
        "}\n"
    )


def removal(node: str) -> str:
    """The ``nft -f`` script that removes this node's table (whether it exists or not)."""
    table = f"inet {table_name(node)}"
    return f"table {table}\ndelete table {table}\n"


def _nft_binary() -> str | None:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def _run_nft(script: str) -> str | None:
    """Apply ``script``; the error text, or ``None`` when nft took it."""
    binary = _nft_binary()
    if binary is None:
        return "the nft command is not installed (Debian package nftables)"
    try:
        proc = subprocess.run(
            [binary, "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nft could not run: {exc}"
    if proc.returncode != 0:
        return f"nft refused the table (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return None


def _short(hostname: str) -> str:
    return hostname.split(".", 1)[0].lower()


async def _elsewhere(hv: Hypervisor) -> str | None:
    """Why this process's network namespace is not libvirtd's host's, if it visibly is not.

    A hostNetwork pod (and a process on the host) has the node's hostname; a pod of its
    own has the pod's. Compared by the first label (libvirt may report the FQDN).
    """
    try:
        theirs = (await hv.host_facts()).hostname
    except hv_errors.HypervisorError as exc:
        # Unknown for now (libvirtd away): the table stands; the next resync asks again.
        _log.warning("cannot ask libvirtd for its hostname", error=str(exc))
        return None
    ours = socket.gethostname()
    if _short(theirs) == _short(ours):
        return None
    return (
        f"the table is in the network namespace of host {ours!r}, but libvirtd (and QEMU) "
        f"run on {theirs!r}: run the agent in the host's network namespace (the chart sets "
        "hostNetwork unless agent.network.userNicHostAccess)"
    )


class GuestFirewall:
    """This node's table, applied at start and at every resync (which heals a flush)."""

    def __init__(self, node: str, policy: NetworkPolicy) -> None:
        self.node = node
        self.policy = policy
        #: Why user NICs cannot be fenced right now; ``None`` once the table is in place.
        self.error: str | None = "the firewall table has not been applied yet"

    @property
    def ready(self) -> bool:
        return self.error is None

    async def ensure(self, hv: Hypervisor | None = None) -> bool:
        """Install (or, with the admin's opt-in, remove) the table; ``ready`` afterwards.

        With ``hv``, the table only counts when libvirtd runs on the agent's own host: a
        table in a pod's network namespace would fence nothing (the agent pod needs
        ``hostNetwork``), so then user NICs stay refused.
        """
        loop = asyncio.get_running_loop()
        if self.policy.user_host_access:
            error = await loop.run_in_executor(None, _run_nft, removal(self.node))
            if error is not None:  # a table left behind only keeps QEMU off the host
                _log.warning("guest firewall table not removed", node=self.node, error=error)
            self.error = None
            return True
        error = await loop.run_in_executor(None, _run_nft, ruleset(self.node, self.policy))
        if error is None and hv is not None:
            error = await _elsewhere(hv)
        if error != self.error:
            if error is None:
                _log.info("guest firewall in place", table=table_name(self.node))
            else:
                _log.error("guest firewall unavailable", node=self.node, error=error)
        self.error = error
        return self.ready
