"""Guests do not reach the host: proven from inside a real guest, on a real node.

A ``type: user`` NIC (the default) is QEMU's slirp: 10.0.2.2 is the node's 127.0.0.1,
as seen by the QEMU process (in the node's network namespace). The guest
(``e2e/guest/init``, ``vf.probe``/``vf.fetch``) gets a DHCP lease from slirp, tries TCP
connections and prints what it found on its serial console. Targets: an HTTP server
this test runs on the node's 127.0.0.1, the kube-apiserver there (the node's route to
its control plane) and the node's libvirtd on the node's own underlay address
(``auth_tcp = none``: a guest that reaches it owns the node). With the agent's default
the three are closed (its nftables table rejects QEMU's connections to the node's own
addresses); with the admin's opt-in (``--user-nic-host-access``) the same guest fetches
the page: the probe can see an open port, so "closed" is the firewall's doing. Every
target is the node's own; a guard table in the node drops anything the test's QEMUs
would send elsewhere (nothing leaves the machine).
"""

from __future__ import annotations

import http.server
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from harness import nodes as hn
from harness import operators
from harness.guest import guest_cmdline
from harness.netns import entered
from harness.testing import Cluster, condition, domain_name, vm_manifest, wait_for
from testkit.httpserve import serve

NODE = "node-a"
AGENT = f"agent-{NODE}"
SLIRP_HOST = "10.0.2.2"
NFT = shutil.which("nft") or "/usr/sbin/nft"
GUARD = "inet virtfleet_e2e_guard"


def nft(system: Cluster, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nft`` in the node's network namespace (where its QEMUs and agent are)."""
    netns = _node_netns(system)
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "--", NFT, *args],
        input=script, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _node_netns(system: Cluster) -> str:
    netns = system.node(NODE).netns
    assert netns is not None
    return netns


@pytest.fixture(scope="module")
def guard(system: Cluster) -> Iterator[None]:
    """Drop whatever the node's QEMUs would send off its loopback (belt and braces: the
    probes only target the node's own addresses)."""
    gid = system.node(NODE).qemu_gid
    rules = (
        f"table {GUARD}\ndelete table {GUARD}\ntable {GUARD} {{\n"
        "  chain out {\n    type filter hook output priority filter - 10; policy accept;\n"
        f'    meta skgid {gid} oifname != "lo" counter drop\n  }}\n}}\n'
    )
    result = nft(system, "-f", "-", script=rules)
    assert result.returncode == 0, result.stderr
    try:
        yield
    finally:
        nft(system, "delete", "table", *GUARD.split())


@pytest.fixture(scope="module")
def secret_page(system: Cluster) -> Iterator[tuple[int, str]]:
    """``(port, line)``: an HTTP server on the node's 127.0.0.1 that answers ``line``."""
    line = f"VF-HOST-SECRET-{secrets.token_hex(4)}"
    body = f"{line}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serve(Handler, while_binding=lambda: entered(_node_netns(system))) as base:
        port = urlsplit(base).port
        assert port is not None
        yield port, line


def targets(system: Cluster, page_port: int) -> dict[str, str]:
    """What each probe dials: the node's loopback through slirp, its libvirtd directly."""
    apiserver = urlsplit(system.env["KUBE_APISERVER"]).port
    node = system.node(NODE)
    return {
        "page": f"{SLIRP_HOST}:{page_port}",
        "kube-apiserver": f"{SLIRP_HOST}:{apiserver}",
        "libvirtd": f"{node.address}:{node.port}",
    }


def probing_vm(name: str, namespace: str, targets: dict[str, str]) -> dict[str, object]:
    return vm_manifest(
        name,
        namespace,
        nodeName=NODE,
        interfaces=[{"name": "default"}],  # type user, the default
        cmdline=guest_cmdline(probe=list(targets.values()), fetch=[f"http://{targets['page']}/"]),
    )


def console(system: Cluster, namespace: str, name: str, prefix: str) -> str:
    """The first console line of the guest that starts with ``prefix`` (waits for it)."""
    pattern = rf"^{re.escape(prefix)}[^\r\n]*"
    match = hn.wait_for_serial(
        system.node(NODE), domain_name(namespace, name), pattern, timeout=180
    )
    return match.group(0).strip()


def firewall_table(system: Cluster) -> str:
    result = nft(system, "list", "table", "inet", f"virtfleet_{NODE.replace('-', '_')}")
    return result.stdout if result.returncode == 0 else ""


def test_a_default_nic_cannot_reach_the_hosts_loopback(
    system: Cluster, namespace: str, guard: None, secret_page: tuple[int, str]
) -> None:
    port, line = secret_page
    ports = targets(system, port)
    gid = f"meta skgid {system.node(NODE).qemu_gid}"
    # The agent (re)started with the system applies it within its first seconds.
    wait_for(lambda: gid in firewall_table(system), 60, 0.5, "the agent's firewall table")
    system.apply(probing_vm("fenced", namespace, ports))

    # Positive control: the NIC works, slirp's DHCP server answered.
    lease = console(system, namespace, "fenced", "VF-NET ")
    assert lease == f"VF-NET eth0 10.0.2.15/24 gw {SLIRP_HOST}"
    for what, target in ports.items():
        seen = console(system, namespace, "fenced", f"VF-PROBE {target} ")
        assert " closed" in seen, f"{what} of the node is reachable: {seen}"
    fetched = console(system, namespace, "fenced", f"VF-FETCH http://{SLIRP_HOST}:{port}/ ")
    assert fetched.endswith(" failed"), fetched
    assert line not in hn.serial_log(system.node(NODE), domain_name(namespace, "fenced"))


def test_with_the_admins_opt_in_the_same_guest_reaches_the_host(
    system: Cluster, namespace: str, guard: None, secret_page: tuple[int, str]
) -> None:
    port, line = secret_page
    ports = targets(system, port)
    operators.kill(system.state_dir, AGENT, signal.SIGTERM)
    operators.start_agent(
        system.state_dir, system.env, system.node(NODE), extra=["--user-nic-host-access"]
    )
    try:
        wait_for(lambda: not firewall_table(system), 60, 0.5, "the agent to remove its table")
        system.apply(probing_vm("open", namespace, ports))
        for target in ports.values():  # every one: a "closed" above is the firewall's doing
            seen = console(system, namespace, "open", f"VF-PROBE {target} ")
            assert seen.endswith(" open"), seen
        fetched = console(system, namespace, "open", f"VF-FETCH http://{SLIRP_HOST}:{port}/ ")
        assert fetched.endswith(f" {line}"), fetched
        system.kubectl("delete", "vm", "open", "-n", namespace, "--wait=true", "--timeout=120s")
    finally:
        operators.kill(system.state_dir, AGENT, signal.SIGTERM)
        operators.start_agent(system.state_dir, system.env, system.node(NODE))
    wait_for(lambda: bool(firewall_table(system)), 60, 0.5, "the default agent's table back")


def test_a_bridge_the_admin_did_not_allow_is_stalled_and_nothing_is_made(
    system: Cluster, namespace: str
) -> None:
    system.apply(
        vm_manifest(
            "bridged",
            namespace,
            nodeName=NODE,
            interfaces=[{"name": "lan", "type": "bridge", "bridge": "cni0"}],
        )
    )

    def stalled() -> dict[str, object] | None:
        cond = condition(system.get("vm", "bridged", namespace), "Stalled")
        return cond if cond and cond.get("reason") == "NetworkNotAllowed" else None

    cond = wait_for(stalled, 120, 1.0, "Stalled/NetworkNotAllowed")
    assert "'cni0'" in str(cond["message"])
    assert "agent.network.allowedBridges" in str(cond["message"])
    listed = subprocess.run(
        ["virsh", "-q", "-c", system.node(NODE).uri, "list", "--all", "--name"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert domain_name(namespace, "bridged") not in listed


def test_a_bridge_the_admin_allows_carries_the_vms(system: Cluster, namespace: str) -> None:
    """A host bridge the harness makes in the node (with a DHCP server on it, as a LAN
    would have), allowed for this namespace only: two VMs on it reach each other."""
    netns = _node_netns(system)
    in_node = ["ip", "netns", "exec", netns]
    script = (
        "ip link add lan0 type bridge && ip addr add 10.81.0.1/24 dev lan0 && ip link set lan0 up"
    )
    subprocess.run([*in_node, "sh", "-c", script], check=True, timeout=30)
    dhcp = subprocess.Popen(
        [*in_node, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
         "--interface=lan0", "--bind-interfaces", "--leasefile-ro",
         "--dhcp-range=10.81.0.10,10.81.0.50,1h"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    operators.kill(system.state_dir, AGENT, signal.SIGTERM)
    operators.start_agent(
        system.state_dir,
        system.env,
        system.node(NODE),
        extra=["--allow-bridge", f"{namespace}=lan0"],
    )
    try:
        lan = [{"name": "lan", "type": "bridge", "bridge": "lan0"}]
        system.apply(
            vm_manifest("first", namespace, nodeName=NODE, interfaces=lan,
                        cmdline=guest_cmdline(echo=7))
        )  # fmt: skip
        first = console(system, namespace, "first", "VF-NET ")
        address = first.split()[2].split("/")[0]
        assert address.startswith("10.81.0."), first
        system.apply(
            vm_manifest("second", namespace, nodeName=NODE, interfaces=lan,
                        cmdline=guest_cmdline(ping=[address]))
        )  # fmt: skip
        assert console(system, namespace, "second", f"VF-PING {address} ") == (
            f"VF-PING {address} ok"
        )
        ports = subprocess.run(
            [*in_node, "ip", "-o", "link", "show", "master", "lan0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert ports.count("vnet") == 2, ports
        system.kubectl("delete", "vm", "first", "second", "-n", namespace, "--wait=true")
    finally:
        dhcp.kill()
        dhcp.wait(timeout=10)
        subprocess.run([*in_node, "ip", "link", "delete", "lan0"], check=False, timeout=30)
        operators.kill(system.state_dir, AGENT, signal.SIGTERM)
        operators.start_agent(system.state_dir, system.env, system.node(NODE))
