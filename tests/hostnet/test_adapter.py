"""The host network adapter against the real kernel, in throwaway network namespaces.

Each "node" and each "VM" is a namespace held by a ``sleep`` started with
``unshare --net``; the adapter works on a node through its ``netns`` path, and the
checks look with iproute2 (``ip``, ``bridge``) and busybox from inside, so they do not
trust the adapter's own observation. Killing the holders frees every link.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtfleet.hostnet.adapter import HostNetwork
from virtfleet.netmodel import (
    UPLINK_RANGE,
    DhcpConfig,
    EnsureVxlan,
    Lease,
    LocalNetwork,
    NatGateway,
    RemoveNetwork,
    gateway_mac,
    uplink_addresses,
)
from virtfleet.reconcile.network_host import plan, repairs

_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"
BUSYBOX = shutil.which("busybox", path=_SBIN)
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")),
        reason="needs unshare, nsenter (util-linux) and ip (iproute2)",
    ),
]
needs_dnsmasq = pytest.mark.skipif(
    shutil.which("dnsmasq", path=_SBIN) is None or BUSYBOX is None,
    reason="needs dnsmasq (dnsmasq-base) and busybox (udhcpc, arping)",
)

VNI = 42
MAC_A, MAC_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


def run_in(path: str, *command: str, check: bool = True) -> str:
    """``command`` in the network namespace at ``path``; its output."""
    done = subprocess.run(
        ["nsenter", f"--net={path}", "--", *command],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{command} failed: {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


class Namespace:
    """A network namespace that lives as long as its holder process."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"])
        self.path = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.stat(self.path).st_ino == os.stat("/proc/self/ns/net").st_ino:
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *command: str, check: bool = True) -> str:
        return run_in(self.path, *command, check=check)

    def link(self, name: str) -> dict[str, Any]:
        shown: list[dict[str, Any]] = json.loads(self.run("ip", "-d", "-j", "link", "show", name))
        return shown[0]

    def our_links(self) -> list[str]:
        shown = json.loads(self.run("ip", "-j", "link", "show"))
        return sorted(link["ifname"] for link in shown if link["ifname"].startswith("vf"))

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def namespace() -> Iterator[Callable[[], Namespace]]:
    made: list[Namespace] = []

    def make() -> Namespace:
        made.append(Namespace())
        return made[-1]

    yield make
    for ns in made:
        ns.close()


@pytest.fixture
def state_dir() -> Iterator[Callable[[], Path]]:
    """World-searchable (dnsmasq re-reads its hosts file as nobody), unlike tmp_path."""
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="virtfleet-hostnet-", dir="/tmp")))
        made[-1].chmod(0o755)
        return made[-1]

    yield make
    for folder in made:
        for pidfile in folder.glob("*.pid"):
            _kill_left_over(pidfile)
        shutil.rmtree(folder)


def _kill_left_over(pidfile: Path) -> None:
    """A failed test must not leave a dnsmasq behind (its own namespace outlives ours)."""
    pid = int(pidfile.read_text().strip() or 0)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"dnsmasq" in cmdline and str(pidfile.parent).encode() in cmdline:
        os.kill(pid, 9)


def node(ns: Namespace, address: str) -> None:
    """An underlay address for the VXLAN's source (on lo: no dummy module needed)."""
    ns.run("ip", "addr", "add", f"{address}/32", "dev", "lo")


def converge(host: HostNetwork, networks: list[LocalNetwork]) -> None:
    assert host.apply(plan(networks, host.observe())) == {}, "no network failed"
    assert plan(networks, host.observe()) == [], "a second pass has nothing to do"


def test_a_network_is_made_as_planned_repaired_and_removed(
    namespace: Callable[[], Namespace], state_dir: Callable[[], Path]
) -> None:
    ns = namespace()
    node(ns, "10.99.0.1")
    host = HostNetwork(state_dir(), netns=ns.path)
    network = LocalNetwork("default/blue", VNI, "10.99.0.1", peers=("10.99.0.2", "10.99.0.3"))
    converge(host, [network])

    bridge = ns.link("vfbr42")
    assert bridge["mtu"] == 1450
    assert "UP" in bridge["flags"]
    assert bridge["linkinfo"]["info_data"]["stp_state"] == 0
    assert bridge["linkinfo"]["info_data"]["forward_delay"] == 0
    assert ns.run("ip", "-j", "addr", "show", "vfbr42").count("local") == 0, "no address"
    vxlan = ns.link("vfvx42")
    data = vxlan["linkinfo"]["info_data"]
    assert (data["id"], data["local"], data["port"], data["learning"]) == (
        VNI,
        "10.99.0.1",
        4789,
        True,
    )
    assert vxlan["master"] == "vfbr42"
    assert vxlan["linkinfo"]["info_slave_data"]["isolated"] is True
    fdb = json.loads(ns.run("bridge", "-j", "fdb", "show", "dev", "vfvx42"))
    flood = sorted(e["dst"] for e in fdb if e["mac"] == "00:00:00:00:00:00")
    assert flood == ["10.99.0.2", "10.99.0.3"]

    ns.run("ip", "link", "del", "vfvx42")
    actions = plan([network], host.observe())
    assert isinstance(repairs(actions)[0], EnsureVxlan)
    converge(host, [network])
    assert ns.link("vfvx42")["master"] == "vfbr42"

    peers_changed = LocalNetwork("default/blue", VNI, "10.99.0.1", peers=("10.99.0.4",))
    converge(host, [peers_changed])
    fdb = json.loads(ns.run("bridge", "-j", "fdb", "show", "dev", "vfvx42"))
    assert [e["dst"] for e in fdb if e["mac"] == "00:00:00:00:00:00"] == ["10.99.0.4"]

    teardown = plan([], host.observe())
    assert [type(a) for a in teardown] == [RemoveNetwork]
    converge(host, [])
    assert ns.our_links() == []


def plug_vm(host_ns: Namespace, vm: Namespace, tap: str, mac: str) -> None:
    """A "VM": a veth whose host end is the tap and whose other end is the VM's eth0."""
    host_ns.run(
        "ip",
        "link",
        "add",
        tap,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        str(vm.holder.pid),
    )
    host_ns.run("ip", "link", "set", tap, "mtu", "1450", "up")
    vm.run("ip", "link", "set", "eth0", "address", mac, "mtu", "1450", "up")


def lease(vm: Namespace) -> str:
    assert BUSYBOX is not None
    out = vm.run(
        BUSYBOX, "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", "/bin/true"
    )
    found = re.search(r"lease of (\S+) obtained from (\S+)", out)
    assert found, out
    vm.run("ip", "addr", "add", f"{found[1]}/24", "dev", "eth0")
    return found[1]


@needs_dnsmasq
def test_two_nodes_serve_their_own_vms_and_carry_them_over_vxlan(
    namespace: Callable[[], Namespace], state_dir: Callable[[], Path]
) -> None:
    node_a, node_b, vm_a, vm_b = namespace(), namespace(), namespace(), namespace()
    node_a.run(
        "ip",
        "link",
        "add",
        "u0",
        "type",
        "veth",
        "peer",
        "name",
        "u0",
        "netns",
        str(node_b.holder.pid),
    )
    for ns, address in ((node_a, "10.99.0.1"), (node_b, "10.99.0.2")):
        ns.run("ip", "addr", "add", f"{address}/24", "dev", "u0")
        ns.run("ip", "link", "set", "u0", "up")
    plug_vm(node_a, vm_a, "tapa", MAC_A)
    plug_vm(node_b, vm_b, "tapb", MAC_B)

    def network(local: str, peer: str, tap: str, *leases: Lease) -> LocalNetwork:
        # The same server address on both nodes: the isolated ports keep them apart.
        dhcp = DhcpConfig("10.50.0.2", 24, gateway=None, leases=leases)
        return LocalNetwork("default/blue", VNI, local, (peer,), dhcp=dhcp, taps=(tap,))

    host_a = HostNetwork(state_dir(), netns=node_a.path)
    host_b = HostNetwork(state_dir(), netns=node_b.path)
    want_a = network("10.99.0.1", "10.99.0.2", "tapa", Lease(MAC_A, "10.50.0.10", "vm-a"))
    want_b = network("10.99.0.2", "10.99.0.1", "tapb", Lease(MAC_B, "10.50.0.11", "vm-b"))
    converge(host_a, [want_a])
    converge(host_b, [want_b])
    assert node_a.link("vfdh42")["linkinfo"]["info_slave_data"]["isolated"] is True
    assert node_a.link("tapa")["linkinfo"]["info_slave_data"]["isolated"] is False

    assert lease(vm_a) == "10.50.0.10"
    assert lease(vm_b) == "10.50.0.11"
    # Across the VXLAN, both ways.
    assert " 0% packet loss" in vm_a.run(BUSYBOX or "", "ping", "-c", "2", "-W", "2", "10.50.0.11")
    assert " 0% packet loss" in vm_b.run(BUSYBOX or "", "ping", "-c", "1", "-W", "2", "10.50.0.10")
    # One answer for the server's address, not one per node.
    arping = vm_a.run(BUSYBOX or "", "arping", "-c", "2", "-w", "2", "-I", "eth0", "10.50.0.2")
    assert "Received 2 response" in arping

    # New leases are a reload, not a restart; the same dnsmasq keeps running.
    pid = host_a.observe().dhcp[VNI].pid
    more = network(
        "10.99.0.1",
        "10.99.0.2",
        "tapa",
        Lease(MAC_A, "10.50.0.10", "vm-a"),
        Lease("52:54:00:00:00:0c", "10.50.0.12", "vm-c"),
    )
    assert [type(a).__name__ for a in plan([more], host_a.observe())] == ["ReloadDhcp"]
    converge(host_a, [more])
    assert host_a.observe().dhcp[VNI].pid == pid

    # A killed server is a repair; the VM's lease is served again.
    assert pid is not None
    os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while host_a.observe().dhcp[VNI].pid is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    actions = plan([more], host_a.observe())
    assert [type(a).__name__ for a in repairs(actions)] == ["StartDhcp"]
    converge(host_a, [more])
    vm_a.run("ip", "addr", "flush", "dev", "eth0")
    assert lease(vm_a) == "10.50.0.10"

    for host, ns in ((host_a, node_a), (host_b, node_b)):
        pids = [s.pid for s in host.observe().dhcp.values()]
        converge(host, [])
        assert ns.our_links() == []
        assert host.observe().dhcp == {}
        assert all(not Path(f"/proc/{p}").exists() for p in pids if p is not None)


ONE_SHOT_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8080))
server.listen(1)
print("listening", flush=True)
conn, peer = server.accept()
conn.sendall(b"hello from outside\\n")
print(peer[0], flush=True)
conn.close()
"""


@needs_dnsmasq
def test_a_nat_gateway_lets_vms_out_behind_the_node_and_keeps_them_off_the_nodes(
    namespace: Callable[[], Namespace], state_dir: Callable[[], Path]
) -> None:
    node_a, node_b, vm, outside = namespace(), namespace(), namespace(), namespace()
    for peer, link, mine, theirs in (
        (node_b, "u0", "10.99.0.1", "10.99.0.2"),
        (outside, "w0", "10.98.0.1", "10.98.0.2"),
    ):
        node_a.run("ip", "link", "add", link, "type", "veth", "peer", "name", link, "netns",
                   str(peer.holder.pid))  # fmt: skip
        for ns, address in ((node_a, mine), (peer, theirs)):
            ns.run("ip", "addr", "add", f"{address}/24", "dev", link)
            ns.run("ip", "link", "set", link, "up")
    # Beyond the outside host: "cloud metadata" and a range the admin denies (the
    # cluster's), both routed there by node a.
    for address in ("169.254.169.254", "10.97.0.1"):
        outside.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        node_a.run("ip", "route", "add", f"{address}/32", "via", "10.98.0.2")
    plug_vm(node_a, vm, "tapa", MAC_A)
    nat = NatGateway("10.50.0.1", uplink_addresses([VNI])[VNI])
    dhcp = DhcpConfig("10.50.0.254", 24, gateway="10.50.0.1", leases=(Lease(MAC_A, "10.50.0.10"),),
                      nat=nat)  # fmt: skip
    want = LocalNetwork("nat", VNI, "10.99.0.1", ("10.99.0.2",), dhcp=dhcp, taps=("tapa",))
    host = HostNetwork(
        state_dir(), netns=node_a.path, local="10.99.0.1", nat_denied=["10.97.0.0/16"]
    )
    host.guard(["10.99.0.2"], [VNI])
    converge(host, [want])
    assert lease(vm) == "10.50.0.10"
    # Forwarding in the gateway's namespace is per interface (netlink), not global.
    pid = host.observe().dhcp[VNI].pid
    assert pid is not None
    forwarding = run_in(
        f"/proc/{pid}/ns/net",
        "cat",
        *(f"/proc/sys/net/ipv4/conf/{i}/forwarding" for i in ("all", "eth0", "up0")),
    )
    assert forwarding.split() == ["0", "1", "1"]
    vm.run("ip", "route", "add", "default", "via", "10.50.0.1")
    # The gateway answers with the MAC every node gives it.
    arping = vm.run(BUSYBOX or "", "arping", "-c", "1", "-w", "2", "-I", "eth0", "10.50.0.1")
    assert gateway_mac(VNI).upper() in arping.upper(), arping

    server = subprocess.Popen(
        ["nsenter", f"--net={outside.path}", "--", sys.executable, "-c", ONE_SHOT_SERVER],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "listening\n"
        reply = vm.run(BUSYBOX or "", "nc", "-w", "3", "10.98.0.2", "8080")
        assert "hello from outside" in reply
        # The world sees the node's own address, not the VM's (nor the uplink's).
        assert server.stdout.readline().strip() == "10.98.0.1"
    finally:
        server.kill()
        server.wait()
    # Neither this node (any of its addresses) nor the other node is reachable, nor
    # link-local metadata, nor a denied range; the outside host is (the control).
    for address in ("10.99.0.1", "10.98.0.1", "10.99.0.2", "169.254.169.254", "10.97.0.1"):
        out = vm.run(BUSYBOX or "", "ping", "-c", "1", "-W", "1", address, check=False)
        assert "100% packet loss" in out, (address, out)
    assert " 0% packet loss" in vm.run(BUSYBOX or "", "ping", "-c", "1", "-W", "2", "10.98.0.2")
    # No tunnel packet leaves as the node (another node's VXLAN would take it from a peer).
    received = udp_received(outside, vm, "10.98.0.2", ports=(4789, 8472, 4790))
    assert received == [4790], received

    # The uplink deleted behind the agent's back: the gateway is made again, a repair.
    node_a.run("ip", "link", "del", "vfgw42")
    assert [type(a).__name__ for a in repairs(plan([want], host.observe()))] == ["PlugGateway"]
    converge(host, [want])
    reply = vm.run(BUSYBOX or "", "ping", "-c", "1", "-W", "2", "10.98.0.2")
    assert " 0% packet loss" in reply

    converge(host, [])
    assert node_a.our_links() == []


UDP_RECEIVER = """
import select, socket, sys
ports = [int(p) for p in sys.argv[1:]]
socks = []
for port in ports:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    socks.append(sock)
print("listening", flush=True)
got = set()
while ports[-1] not in got:  # the last port is the control: sent last, always let through
    ready, _, _ = select.select(socks, [], [], 10)
    if not ready:
        break
    for sock in ready:
        sock.recv(2048)
        got.add(sock.getsockname()[1])
print(" ".join(str(p) for p in sorted(got)), flush=True)
"""


def udp_received(
    outside: Namespace, vm: Namespace, address: str, ports: tuple[int, ...]
) -> list[int]:
    """The ports of ``ports`` on which ``outside`` got the VM's datagram (the last one is
    a control that must get through)."""
    receiver = subprocess.Popen(
        ["nsenter", f"--net={outside.path}", "--", sys.executable, "-c", UDP_RECEIVER,
         *map(str, ports)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline() == "listening\n"
        for port in ports:
            send = f"import socket; socket.socket(2, 2).sendto(b'x', ({address!r}, {port}))"
            vm.run(sys.executable, "-c", send)
        return [int(p) for p in receiver.stdout.readline().split()]
    finally:
        receiver.kill()
        receiver.wait()


@needs_dnsmasq
def test_a_lower_vni_takes_an_uplink_address_and_the_other_network_moves_on(
    namespace: Callable[[], Namespace], state_dir: Callable[[], Path]
) -> None:
    host_ns = namespace()
    node(host_ns, "10.99.0.1")

    def nat_network(vni: int, vnis: list[int]) -> LocalNetwork:
        nat = NatGateway("10.50.0.1", uplink_addresses(vnis)[vni])
        dhcp = DhcpConfig("10.50.0.254", 24, gateway="10.50.0.1", nat=nat)
        return LocalNetwork(f"net{vni}", vni, "10.99.0.1", dhcp=dhcp)

    high = 42 + UPLINK_RANGE.num_addresses - 3  # the same slot as VNI 42
    host = HostNetwork(state_dir(), netns=host_ns.path, local="10.99.0.1")
    converge(host, [nat_network(high, [high])])
    assert uplink_addresses([high]) == {high: "169.254.64.44"}
    assert uplink_addresses([42, high]) == {42: "169.254.64.44", high: "169.254.64.45"}
    both = [nat_network(42, [42, high]), nat_network(high, [42, high])]
    converge(host, both)  # no EEXIST on the address the lower VNI takes over
    routes = host_ns.run("ip", "-4", "route", "show")
    assert "169.254.64.44 dev vfgw42 " in routes, routes
    assert f"169.254.64.45 dev vfgw{high} " in routes, routes
    converge(host, [])
    assert host_ns.our_links() == []
