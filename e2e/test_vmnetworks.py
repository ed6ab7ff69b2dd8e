"""VMNetworks on the real system: guests on two nodes share an L2 segment, proven from
their own consoles.

Each harness node has its own network namespace joined to the others by an underlay
(:mod:`harness.underlay`); the agents realise a VMNetwork there as a bridge plus a VXLAN
device with head-end replication to the other node, and a dnsmasq that hands the
controller's addresses out. The guests (``e2e/guest/init``) take a DHCP lease, ping,
serve and keep a TCP session, and print what happened on their serial consoles. Nodes
are inspected with ``ip`` inside their namespaces.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import nodes as hn
from harness import operators, underlay
from harness.guest import guest_cmdline
from harness.testing import (
    Cluster,
    condition,
    console,
    dhcp_servers,
    domain_name,
    in_node,
    migration_manifest,
    vm_ip,
    vm_manifest,
    wait_for,
)

ECHO_PORT = 7
RED_SUBNET = "10.77.0.0/24"
BLUE_SUBNET = "10.78.0.0/24"


def vmnetwork(name: str, namespaces: list[str], subnet: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMNetwork",
        "metadata": {"name": name},
        "spec": {"namespaces": namespaces, "subnet": subnet, **spec},
    }


def links(node: hn.Node) -> dict[str, dict[str, Any]]:
    """The node's VMNetwork links (``vfbr*``, ``vfvx*``, ``vfdh*``) by name."""
    shown = json.loads(in_node(node, "ip", "-d", "-j", "link", "show") or "[]")
    return {link["ifname"]: link for link in shown if link["ifname"].startswith("vf")}


def flood_peers(node: hn.Node, vxlan: str) -> set[str]:
    fdb = json.loads(in_node(node, "bridge", "-j", "fdb", "show", "dev", vxlan) or "[]")
    return {e["dst"] for e in fdb if e.get("mac") == "00:00:00:00:00:00" and "dst" in e}


def running_on(system: Cluster, namespace: str, name: str) -> str | None:
    status = system.get("vm", name, namespace).get("status") or {}
    return status.get("nodeName") if status.get("printableStatus") == "Running" else None


@pytest.fixture
def networks(system: Cluster, namespace: str) -> Iterator[None]:
    system.apply(vmnetwork("red", [namespace], RED_SUBNET))
    system.apply(vmnetwork("blue", [namespace], BLUE_SUBNET))
    try:
        yield
    finally:
        system.kubectl("delete", "vm", "--all", "-n", namespace, "--wait=true", "--timeout=180s")
        system.kubectl("delete", "vmnetwork", "red", "blue", "--wait=true", "--timeout=120s")


def test_vms_on_two_nodes_share_a_network_and_keep_it_across_a_migration(
    system: Cluster, namespace: str, networks: None
) -> None:
    a, b = system.nodes[0], system.nodes[1]
    red = [{"name": "red", "type": "network", "network": "red"}]
    system.apply(
        vm_manifest(
            "server", namespace, nodeName=a.name, interfaces=red, cmdline=guest_cmdline(echo=7)
        )
    )
    server_ip = vm_ip(system, namespace, "server")
    assert console(a, namespace, "server", r"^VF-NET [^\r\n]*") == (
        f"VF-NET eth0 {server_ip}/24 gw none"
    )
    console(a, namespace, "server", rf"^VF-ECHO {ECHO_PORT}\b")

    # The nodes' own addresses are on-link tries too: the guard keeps VMs off them.
    cmdline = guest_cmdline(
        ping=[server_ip, str(a.address), str(b.address)],
        talk=f"{server_ip}:{ECHO_PORT}",
        watch=server_ip,
    )
    system.apply(vm_manifest("client", namespace, nodeName=b.name, interfaces=red, cmdline=cmdline))
    client_ip = vm_ip(system, namespace, "client")
    assert client_ip != server_ip
    assert console(b, namespace, "client", r"^VF-NET [^\r\n]*").startswith(
        f"VF-NET eth0 {client_ip}/24"
    )
    # Across nodes: the client on b reaches the server on a over the VXLAN.
    assert console(b, namespace, "client", rf"^VF-PING {re.escape(server_ip)} \w+") == (
        f"VF-PING {server_ip} ok"
    )
    for node in (a, b):
        seen = console(b, namespace, "client", rf"^VF-PING {re.escape(str(node.address))} \w+")
        assert seen == f"VF-PING {node.address} failed", f"a VM reaches {node.name}: {seen}"
    console(b, namespace, "client", r"^VF-TALK 20\b")

    # The nodes' plumbing, as ip sees it in each node's namespace.
    vni = int(system.get("vmnetwork", "red")["status"]["vni"])
    for node, other in ((a, b), (b, a)):
        found = links(node)
        assert {f"vfbr{vni}", f"vfvx{vni}", f"vfdh{vni}"} <= set(found), found
        vxlan = found[f"vfvx{vni}"]["linkinfo"]["info_data"]
        assert (vxlan["id"], vxlan["local"], vxlan["port"]) == (vni, node.address, 4789)
        assert found[f"vfbr{vni}"]["mtu"] == 1450
        assert flood_peers(node, f"vfvx{vni}") == {other.address}
        assert dhcp_servers(node), f"no DHCP server on {node.name}"

    # A VM on another network cannot reach either of them (on-link ARP, no route needed).
    blue = [{"name": "blue", "type": "network", "network": "blue"}]
    system.apply(
        vm_manifest(
            "outsider",
            namespace,
            nodeName=b.name,
            interfaces=blue,
            cmdline=guest_cmdline(ping=[server_ip, client_ip]),
        )
    )
    assert console(b, namespace, "outsider", r"^VF-NET [^\r\n]*").startswith("VF-NET eth0 10.78.")
    for ip in (server_ip, client_ip):
        seen = console(b, namespace, "outsider", rf"^VF-PING {re.escape(ip)} \w+")
        assert seen == f"VF-PING {ip} failed", seen

    # Live-migrate the server to b: same address, the client's session and pings go on.
    started = time.monotonic()
    system.apply(migration_manifest("move", namespace, "server", targetNode=b.name))

    def done() -> dict[str, Any] | None:
        status = system.get("vmmig", "move", namespace).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(done, 240, 0.5, "the migration to end")
    assert status["phase"] == "Succeeded", status
    print(f"\n[vmnetwork] migration took {time.monotonic() - started:.1f}s")
    wait_for(lambda: running_on(system, namespace, "server") == b.name, 60, what="server on b")
    assert vm_ip(system, namespace, "server") == server_ip
    log = hn.serial_log(b, domain_name(namespace, "client"))
    talked = max(int(n) for n in re.findall(r"^VF-TALK (\d+)", log, re.M))
    # The same TCP connection carries on after the switch-over (no VF-TALK-END).
    console(b, namespace, "client", rf"^VF-TALK {talked + 30}\b", timeout=60)
    log = hn.serial_log(b, domain_name(namespace, "client"))
    assert "VF-TALK-END" not in log
    lost = [(int(s), int(n)) for s, n in re.findall(r"^VF-WATCH-LOST (\d+) (\d+)", log, re.M)]
    pings = max(int(n) for n in re.findall(r"^VF-WATCH (\d+)", log, re.M))
    print(
        f"[vmnetwork] pings every 50 ms during the migration: {sum(n for _, n in lost)} lost "
        f"of ~{pings} (gaps: {lost})"
    )
    # The network left a with its last VM: nothing of it stays there.
    wait_for(lambda: not links(a), 60, 0.5, f"{a.name}'s VMNetwork links to go")
    assert not dhcp_servers(a)

    # Faults on b: its agent killed and restarted, its libvirtd restarted. The session
    # and the DHCP server carry on untouched.
    servers = dhcp_servers(b)
    operators.kill(system.state_dir, f"agent-{b.name}")
    operators.start_agent(system.state_dir, system.env, b)
    hn.restart_libvirtd(b)
    log = hn.serial_log(b, domain_name(namespace, "client"))
    talked = max(int(n) for n in re.findall(r"^VF-TALK (\d+)", log, re.M))
    console(b, namespace, "client", rf"^VF-TALK {talked + 50}\b", timeout=60)
    assert "VF-TALK-END" not in hn.serial_log(b, domain_name(namespace, "client"))
    assert dhcp_servers(b) == servers


def test_a_namespace_the_network_does_not_allow_is_stalled(system: Cluster, namespace: str) -> None:
    system.apply(vmnetwork("private", ["somebody-else"], "10.79.0.0/24"))
    try:
        nic = [{"name": "lan", "type": "network", "network": "private"}]
        system.apply(vm_manifest("intruder", namespace, interfaces=nic))

        def stalled() -> dict[str, Any] | None:
            cond = condition(system.get("vm", "intruder", namespace), "Stalled")
            return cond if cond and cond.get("reason") == "NetworkNotAllowed" else None

        cond = wait_for(stalled, 120, 1.0, "Stalled/NetworkNotAllowed")
        assert "spec.namespaces" in str(cond["message"])
        assert not (system.get("vm", "intruder", namespace).get("status") or {}).get("nodeName")
    finally:
        system.kubectl("delete", "vm", "intruder", "-n", namespace, "--wait=true")
        system.kubectl("delete", "vmnetwork", "private", "--wait=true", "--timeout=60s")


def test_drift_is_healed_and_the_network_goes_with_its_last_vm(
    system: Cluster, namespace: str
) -> None:
    a = system.nodes[0]
    system.apply(vmnetwork("green", [namespace], "10.80.0.0/24"))
    nic = [{"name": "green", "type": "network", "network": "green"}]
    system.apply(vm_manifest("lonely", namespace, nodeName=a.name, interfaces=nic,
                             cmdline=guest_cmdline(net=True)))  # fmt: skip
    ip = vm_ip(system, namespace, "lonely")
    console(a, namespace, "lonely", rf"^VF-NET eth0 {re.escape(ip)}/24")
    vni = int(system.get("vmnetwork", "green")["status"]["vni"])
    wait_for(lambda: f"vfvx{vni}" in links(a), 60, 0.5, "the VXLAN device")

    in_node(a, "ip", "link", "delete", f"vfbr{vni}")  # behind the agent's back
    wait_for(lambda: f"vfbr{vni}" in links(a), 30, 0.5, "the bridge made again")

    def repaired() -> bool:
        events = system.kubectl(
            "get", "events", "-A", "--field-selector", "reason=NetworkRepaired", "-o", "json"
        ).stdout
        return any(e["involvedObject"].get("name") == "green" for e in json.loads(events)["items"])

    wait_for(repaired, 30, 1.0, "a NetworkRepaired Event")
    # The running VM's tap is a port of the new bridge again.
    tap_master = wait_for(
        lambda: any(
            link.get("master") == f"vfbr{vni}" and name.startswith("vnet")
            for name, link in _all_links(a).items()
        ),
        30,
        0.5,
        "the VM's tap back on the bridge",
    )
    assert tap_master

    system.kubectl("delete", "vm", "lonely", "-n", namespace, "--wait=true", "--timeout=120s")
    wait_for(lambda: not links(a), 60, 0.5, "the network's links to go with its last VM")
    assert not dhcp_servers(a)
    assert a.netns is not None
    left = sorted(p.name for p in underlay.network_state_dir(a.netns).glob(f"*{vni}*"))
    assert not left, f"the DHCP server's files stay: {left}"
    system.kubectl("delete", "vmnetwork", "green", "--wait=true", "--timeout=60s")
    assert "green" not in system.kubectl("get", "vmnetwork", "-o", "name").stdout


def _all_links(node: hn.Node) -> dict[str, dict[str, Any]]:
    shown = json.loads(in_node(node, "ip", "-j", "link", "show") or "[]")
    return {link["ifname"]: link for link in shown}


class _WhoAsks(http.server.BaseHTTPRequestHandler):
    """Answers with the address the request came from: what a NAT put in front of it."""

    def do_GET(self) -> None:
        body = f"from {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows the assertions."""


@pytest.fixture
def outside(system: Cluster) -> Iterator[str]:
    """An HTTP server on the machine's end of the underlay: "the world" the nodes route to
    (nothing leaves the machine)."""
    server = http.server.ThreadingHTTPServer((underlay.host_address(system.state_dir), 0), _WhoAsks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{underlay.host_address(system.state_dir)}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_nat_gateway_takes_vms_out_behind_their_own_node_and_not_into_the_nodes(
    system: Cluster, namespace: str, outside: str
) -> None:
    a, b = system.nodes[0], system.nodes[1]
    gateway = "10.81.0.1"
    system.apply(vmnetwork("exit", [namespace], "10.81.0.0/24", gateway=gateway, nat=True))
    try:
        nic = [{"name": "exit", "type": "network", "network": "exit"}]
        probes = [gateway, str(a.address), str(b.address)]
        for name, node in (("out-a", a), ("out-b", b)):
            cmdline = guest_cmdline(fetch=[f"http://{outside}/"], ping=probes)
            system.apply(vm_manifest(name, namespace, nodeName=node.name, interfaces=nic,
                                     cmdline=cmdline))  # fmt: skip
        for name, node in (("out-a", a), ("out-b", b)):
            ip = vm_ip(system, namespace, name)
            lease = console(node, namespace, name, r"^VF-NET [^\r\n]*")
            assert lease == f"VF-NET eth0 {ip}/24 gw {gateway}", lease
            # Out through its own node's gateway: the world sees that node's address.
            fetched = console(node, namespace, name, rf"^VF-FETCH http://{outside}/ [^\r\n]*")
            assert fetched == f"VF-FETCH http://{outside}/ from {node.address}", fetched
            seen = console(node, namespace, name, rf"^VF-PING {re.escape(gateway)} \w+")
            assert seen == f"VF-PING {gateway} ok", seen
            for other in (a, b):  # the gateway leads out, never into a node
                address = re.escape(str(other.address))
                seen = console(node, namespace, name, rf"^VF-PING {address} \w+")
                assert seen.endswith(" failed"), f"{name} reaches {other.name}: {seen}"

        # Every node is the same gateway (address and MAC): a migrated VM keeps its route.
        vni = int(system.get("vmnetwork", "exit")["status"]["vni"])
        macs = {gateway_mac_on(node) for node in (a, b)}
        assert macs == {f"0a:76:01:{vni >> 16:02x}:{(vni >> 8) & 255:02x}:{vni & 255:02x}"}
        for node in (a, b):
            assert f"vfgw{vni}" in links(node)
    finally:
        system.kubectl("delete", "vm", "--all", "-n", namespace, "--wait=true", "--timeout=180s")
        system.kubectl("delete", "vmnetwork", "exit", "--wait=true", "--timeout=120s")
    for node in (a, b):
        wait_for(lambda n=node: not links(n), 60, 0.5, f"{node.name}'s gateway to go")  # type: ignore[misc]


def gateway_mac_on(node: hn.Node) -> str:
    """The MAC of ``eth0`` in the node's gateway namespace (its dnsmasq's)."""
    (pid,) = dhcp_servers(node)
    shown = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", "-j", "link", "show", "eth0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return str(json.loads(shown)[0]["address"])
