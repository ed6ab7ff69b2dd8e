"""What a VM's NICs may reach on this node: the node admin's network policy.

A manifest names NICs, and a user who may create VMs is not trusted with the host's
networks (docs/security.md). So the agent decides, per node:

* **bridge NICs** attach only to host bridges that the admin allows for the VM's
  namespace (``{namespace or "*": [names]}``); anything else is refused before a volume
  or a domain is made (``Stalled``, reason ``NetworkNotAllowed``). **network NICs**
  attach to a VMNetwork, whose ``spec.namespaces`` (the cluster admin's) says who may
  (:mod:`virtfleet.agent.vmnetworks`). Both get libvirt's ``clean-traffic`` nwfilter by
  default: on a shared L2 segment the guest may only send with its own MAC and the one
  IP it uses.
* **user NICs** (QEMU's slirp) make connections *as the QEMU process*: the guest reaches
  the host's loopback at 10.0.2.2, and every address of the host and the link-local
  metadata service (169.254.169.254). Unless the admin allows that (``user_host_access``),
  the agent keeps an nftables table (:mod:`virtfleet.agent.guestfirewall`) that rejects
  new connections of QEMU's group to those addresses, and refuses to run a VM with a
  user NIC while that table is not in place (``GuestFirewallUnavailable``).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.domain.inputs import DEFAULT_NWFILTER, NWFILTER_NAME

__all__ = [
    "DEBIAN_QEMU_GID",
    "DEFAULT_USER_NIC_DENY",
    "NETWORK_NOT_ALLOWED",
    "NetworkPolicy",
    "add_arguments",
    "needs_firewall",
    "policy_from_args",
    "refusal",
]

#: Reason of the ``Stalled`` condition of a VM whose NIC names what its namespace may not use.
NETWORK_NOT_ALLOWED: Final = "NetworkNotAllowed"

#: Group of Debian's ``libvirt-qemu`` (qemu.conf ``group``; a fixed id in base-passwd).
DEBIAN_QEMU_GID: Final = 64055

#: Besides the host's own addresses: link-local (cloud metadata at 169.254.169.254, and
#: IPv6 link-local) and AWS's IPv6 metadata address.
DEFAULT_USER_NIC_DENY: Final = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")

_ANY_NAMESPACE: Final = "*"
_PORTS: Final = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")

Allowed = Mapping[str, frozenset[str]]


def _frozen(allowed: Mapping[str, Iterable[str]]) -> Allowed:
    return MappingProxyType({ns: frozenset(names) for ns, names in allowed.items()})


@dataclass(frozen=True)
class NetworkPolicy:
    """The node admin's answer to "what may this VM's NICs reach" (agent flags)."""

    #: Host bridges per namespace (``"*"``: every namespace). Empty: no bridge NICs.
    allowed_bridges: Allowed = field(default_factory=lambda: _frozen({}))
    #: nwfilter on bridge and network NICs; ``None`` turns filtering off.
    nwfilter: str | None = DEFAULT_NWFILTER
    #: The admin's opt-in: user NICs may reach the host (no firewall table is kept).
    user_host_access: bool = False
    #: The group QEMU runs as (qemu.conf ``group``): what the firewall recognises it by.
    qemu_gid: int = DEBIAN_QEMU_GID
    #: Address ranges QEMU may not connect to, besides the host's own addresses.
    user_nic_deny: tuple[str, ...] = DEFAULT_USER_NIC_DENY
    #: Ports (``"53"``, ``"49152-49215"``) of the host's own addresses QEMU may still
    #: connect to (a local DNS stub; QEMU's NBD migration streams when nodes share a host).
    user_nic_local_ports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_bridges", _frozen(self.allowed_bridges))
        if self.nwfilter is not None and not NWFILTER_NAME.fullmatch(self.nwfilter):
            raise ValueError(f"{self.nwfilter!r} is not an nwfilter name")
        for cidr in self.user_nic_deny:
            ipaddress.ip_network(cidr, strict=False)  # ValueError: refused at start
        for ports in self.user_nic_local_ports:
            _check_ports(ports)
        if not 0 < self.qemu_gid < 2**32:
            # Group 0 is root's: the table would fence the whole host, not QEMU.
            raise ValueError(
                f"qemu gid {self.qemu_gid} is not a group QEMU alone runs as (qemu.conf "
                "'group'; root's group 0 cannot be told apart from the host's processes)"
            )


def _check_ports(text: str) -> str:
    match = _PORTS.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a port or a range of ports (53, 49152-49215)")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r} is not a port or a range of ports within 1-65535")
    return text


def _allows(allowed: Allowed, namespace: str, name: str) -> bool:
    return name in allowed.get(namespace, ()) or name in allowed.get(_ANY_NAMESPACE, ())


#: Per NIC type: what it attaches to, the agent flag and chart value that allow it.
_ATTACHMENTS: Final = {
    InterfaceType.BRIDGE: ("host bridge", "--allow-bridge", "allowedBridges"),
}


def refusal(namespace: str, spec: VirtualMachineSpec, policy: NetworkPolicy) -> str | None:
    """Why ``spec``'s NICs may not be made in ``namespace`` on this node; ``None``: they may."""
    allowed = {InterfaceType.BRIDGE: policy.allowed_bridges}
    for nic in spec.interfaces:
        name = nic.bridge
        if nic.type not in _ATTACHMENTS or name is None:
            continue
        if not _allows(allowed[nic.type], namespace, name):
            what, flag, value = _ATTACHMENTS[nic.type]
            return (
                f"interface {nic.name!r}: {what} {name!r} is not allowed for namespace "
                f"{namespace!r} on this node (the node admin allows them with the agent's "
                f"{flag}, chart value agent.network.{value})"
            )
    return None


def needs_firewall(spec: VirtualMachineSpec, policy: NetworkPolicy) -> bool:
    """A user NIC that must not reach the host: it may only run behind the firewall."""
    return not policy.user_host_access and any(
        nic.type == InterfaceType.USER for nic in spec.interfaces
    )


# --- command line -------------------------------------------------------------------------


def _allowance(text: str) -> tuple[str, tuple[str, ...]]:
    namespace, sep, names = text.partition("=")
    items = tuple(n for n in names.split(",") if n)
    if not sep or not namespace or not items:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAMESPACE=NAME[,NAME...] (NAMESPACE may be '*')"
        )
    return namespace, items


def _merged(pairs: Iterable[tuple[str, tuple[str, ...]]] | None) -> dict[str, set[str]]:
    merged: dict[str, set[str]] = {}
    for namespace, names in pairs or ():
        merged.setdefault(namespace, set()).update(names)
    return merged


def cidr_argument(text: str) -> str:
    """An address range flag, checked when parsed (a typo must not start an agent)."""
    if text == "none":  # the chart's way to say "an empty list" (the flag replaces defaults)
        return text
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a CIDR: {text!r} ({exc})") from exc
    return text


def _ports(text: str) -> str:
    try:
        return _check_ports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _gid(text: str) -> int:
    try:
        gid = int(text)
        NetworkPolicy(qemu_gid=gid)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return gid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's network flags (one place, so ``cli`` only wires them)."""
    group = parser.add_argument_group("guest networks (docs/security.md)")
    group.add_argument(
        "--allow-bridge",
        action="append",
        type=_allowance,
        metavar="NAMESPACE=BRIDGE[,BRIDGE]",
        help="host bridges VMs of NAMESPACE ('*': any) may attach to (repeatable; default: none)",
    )
    group.add_argument(
        "--nwfilter",
        default=DEFAULT_NWFILTER,
        metavar="NAME",
        help=f"libvirt nwfilter on bridge and network NICs (default {DEFAULT_NWFILTER}; "
        "'none' for no filter)",
    )
    group.add_argument(
        "--user-nic-host-access",
        action="store_true",
        help="let user NICs reach this host's own addresses and link-local ones "
        "(no firewall table; default: refused)",
    )
    group.add_argument(
        "--qemu-gid",
        type=_gid,
        default=DEBIAN_QEMU_GID,
        metavar="GID",
        help=f"group QEMU runs as, qemu.conf 'group' (default {DEBIAN_QEMU_GID}, Debian's "
        "libvirt-qemu): the firewall keeps this group's connections off the host",
    )
    group.add_argument(
        "--user-nic-deny-cidr",
        action="append",
        type=cidr_argument,
        metavar="CIDR",
        help="an address range user NICs may not reach besides the host's own addresses "
        f"(repeatable; replaces the default {', '.join(DEFAULT_USER_NIC_DENY)}; "
        "'none' for no range)",
    )
    group.add_argument(
        "--user-nic-allow-local-port",
        action="append",
        type=_ports,
        metavar="PORT[-PORT]",
        help="a port of the host's own addresses QEMU may still connect to, e.g. 53 for a "
        "local DNS stub (repeatable; default: none)",
    )


def policy_from_args(args: argparse.Namespace) -> NetworkPolicy:
    """The policy the flags of :func:`add_arguments` describe."""
    return NetworkPolicy(
        allowed_bridges=_frozen(_merged(args.allow_bridge)),
        nwfilter=None if args.nwfilter in ("", "none") else args.nwfilter,
        user_host_access=args.user_nic_host_access,
        qemu_gid=args.qemu_gid,
        user_nic_deny=tuple(
            c for c in args.user_nic_deny_cidr or DEFAULT_USER_NIC_DENY if c != "none"
        ),
        user_nic_local_ports=tuple(args.user_nic_allow_local_port or ()),
    )
