"""The netlink request that turns on an interface's IPv4 forwarding, byte by byte (the
adapter test proves the kernel takes it: its gateway forwards with it alone)."""

from __future__ import annotations

import struct

from virtfleet.hostnet.devconf import setlink_forwarding


def test_the_request_nests_af_spec_inet_conf_forwarding() -> None:
    message = setlink_forwarding(7, True, sequence=3)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, sequence) == (len(message), 19, 0x5, 3)
    _family, index = struct.unpack_from("=Bxxxi", message, 16)
    assert index == 7
    attributes = message[32:]
    # IFLA_AF_SPEC(26) > AF_INET(2) > IFLA_INET_CONF(1) > FORWARDING(1) = 1, all nested.
    assert attributes == bytes.fromhex("1400 1a80 1000 0280 0c00 0180 0800 0100 01000000")
