"""IPv4 forwarding of one interface, set over netlink.

Why not ``/proc/sys/net/ipv4/conf/<if>/forwarding``: an unprivileged container (the
chart's agent with NET_ADMIN only) sees ``/proc/sys`` read-only, while netlink lets
NET_ADMIN set an interface's IPv4 settings (``RTM_SETLINK`` with ``IFLA_AF_SPEC`` →
``AF_INET`` → ``IFLA_INET_CONF``, what the kernel's ``inet_set_link_af`` reads). The
kernel decides forwarding by the *input* interface's flag, so a gateway's two ends are
enough. pyroute2 models ``AF_INET`` as the dump's struct, not the nested attributes a
set takes, hence these few bytes by hand.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Final

from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.hostnet.netns import entered

__all__ = ["set_forwarding"]

_RTM_SETLINK: Final = 19
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLMSG_ERROR: Final = 2
_NLA_F_NESTED: Final = 0x8000
_IFLA_AF_SPEC: Final = 26
_IFLA_INET_CONF: Final = 1
_IPV4_DEVCONF_FORWARDING: Final = 1


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def setlink_forwarding(index: int, on: bool, sequence: int = 1) -> bytes:
    """The RTM_SETLINK request (pure, for the tests)."""
    value = _attribute(_IPV4_DEVCONF_FORWARDING, struct.pack("=I", int(on)))
    conf = _attribute(_IFLA_INET_CONF | _NLA_F_NESTED, value)
    inet = _attribute(socket.AF_INET | _NLA_F_NESTED, conf)
    spec = _attribute(_IFLA_AF_SPEC | _NLA_F_NESTED, inet)
    info = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)
    body = info + spec
    header = struct.pack("=IHHII", 16 + len(body), _RTM_SETLINK,
                         _NLM_F_REQUEST | _NLM_F_ACK, sequence, 0)  # fmt: skip
    return header + body


def set_forwarding(netns: str | None, ifname: str, on: bool = True) -> None:
    """Forward IPv4 arriving on ``ifname`` (in the namespace at path ``netns``)."""
    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    with sock:
        with entered(netns):
            index = socket.if_nametoindex(ifname)
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(setlink_forwarding(index, on))
        reply = sock.recv(65536)
    if len(reply) < 20:
        raise HostNetworkError(f"a short netlink reply setting forwarding on {ifname}")
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    (error,) = struct.unpack_from("=i", reply, 16)
    if kind != _NLMSG_ERROR or error != 0:
        code = -error if error < 0 else errno.EPROTO
        raise HostNetworkError(f"forwarding on {ifname}: {os.strerror(code)}")
