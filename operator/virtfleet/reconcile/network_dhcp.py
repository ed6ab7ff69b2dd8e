"""The dnsmasq config and hosts file of one network on one node, rendered.

Pure: the planner compares the fingerprint of what it renders with what the running
dnsmasq was given, so a change of config (restart) and of leases (SIGHUP, which re-reads
only the hosts file) are told apart without reading dnsmasq's state.

The config carries no paths: the adapter passes pid file and hosts file on the command
line, so the same network renders the same text on every node and in every state dir.
"""

from __future__ import annotations

import ipaddress
import re

from virtfleet.netmodel import DhcpConfig, LocalNetwork, with_fingerprint

_NOT_HOSTNAME = re.compile(r"[^a-z0-9-]+")


def dnsmasq_config(network: LocalNetwork) -> str:
    """The ``--conf-file`` of the network's dnsmasq, headed by its fingerprint.

    DHCP only (``port=0``), static leases only (a MAC not in the hosts file gets
    nothing), no lease database (the leases are fixed, a restart forgets nothing), and
    it drops root for ``nobody`` once its sockets are open.
    """
    dhcp = _dhcp(network)
    subnet = ipaddress.ip_interface(f"{dhcp.address}/{dhcp.prefix_length}").network
    router = f"option:router,{dhcp.gateway}" if dhcp.gateway else "option:router"
    dns = ",".join(("option:dns-server", *dhcp.dns_servers))
    lines = [
        f"# dnsmasq of VMNetwork {network.name} (VNI {network.vni}), by the virtfleet agent",
        "port=0",
        "no-resolv",
        "no-hosts",
        "interface=eth0",
        "leasefile-ro",
        "dhcp-authoritative",
        f"dhcp-range={subnet.network_address},static,{subnet.netmask},{dhcp.lease_seconds}",
        # Empty options are sent as "none": no route off an isolated segment, no DNS.
        f"dhcp-option={router}",
        f"dhcp-option={dns}",
        # Guests would assume 1500 and lose big frames to the VXLAN overhead.
        f"dhcp-option=option:mtu,{network.mtu}",
        # The gateway is not dnsmasq's business, but a change of it must restart the
        # namespace it lives in: it is part of what the fingerprint covers.
        *(
            [f"# NAT gateway {dhcp.nat.address}, uplink {dhcp.nat.uplink}"]
            if dhcp.nat is not None
            else []
        ),
        # Routine lease traffic stays out of the log (it lives on tmpfs); errors do not.
        "quiet-dhcp",
        "log-facility=-",
        "user=nobody",
        "group=nogroup",
    ]
    return with_fingerprint("\n".join(lines) + "\n")


def dnsmasq_hosts(dhcp: DhcpConfig) -> str:
    """``<mac>,<ip>[,<hostname>]`` per lease, sorted: the same leases, the same text."""
    lines = []
    for lease in sorted(dhcp.leases, key=lambda lease: lease.mac.lower()):
        entry = f"{lease.mac.lower()},{lease.ip}"
        hostname = dhcp_hostname(lease.hostname)
        lines.append(f"{entry},{hostname}" if hostname else entry)
    return "".join(f"{line}\n" for line in lines)


def dhcp_hostname(name: str) -> str:
    """A single DNS label for option 12: dnsmasq ignores names whose domain it does not
    serve, and a VM name may have dots (``web.prod`` → ``web-prod``)."""
    label = _NOT_HOSTNAME.sub("-", name.lower()).strip("-")
    return label[:63].rstrip("-")


def _dhcp(network: LocalNetwork) -> DhcpConfig:
    if network.dhcp is None:
        raise ValueError(f"network {network.name} has no DHCP")
    return network.dhcp
