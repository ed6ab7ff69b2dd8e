"""VMNetwork data path: VM-to-VM throughput and latency across nodes, next to the same two
QEMUs on a bridge + VXLAN made by hand; and a live migration's downtime with a VMNetwork
NIC and without.

virtfleet's side: a VMNetwork, a "sink" guest on node-a (a TCP server that discards) and a
"sender" guest on node-b that sends M MiB N times over fresh TCP connections
(``VF-SENT <MiB> <seconds>``, timed by the guest) and then averages 20 pings
(``VF-RTT``). Raw side, same run: on each node a bridge and a VXLAN device (another VNI,
the same MTU) made with ``ip`` as an admin would, and twins of the same two domains
(static addresses, no nwfilter) doing the same. The data path must be the kernel's on
both sides (ratio ≈ 1.0): there is no userspace hop in virtfleet's. The guests run under
TCG on a 2-core machine, so absolute figures are low; the ratio is what is judged.

Downtime: the VMMigration's ``status.downtimeMs`` (libvirt's figure) of the sink guest
with its VMNetwork NIC, and of a guest without any NIC, migrated the same way.
"""

from __future__ import annotations

import json
import re
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt

from bench import guests
from bench.result import BenchContext, Row, ScenarioResult
from bench.scenarios.failover import kubectl, status_of
from harness import nodes as hn
from harness.guest import guest_cmdline
from harness.testing import Cluster, domain_name, in_node, migration_manifest, vm_manifest

PORT = 5001
RAW_VNI = 99
RAW_BRIDGE, RAW_VXLAN = "rawbr0", "rawvx0"
RAW_SINK, RAW_SENDER = "10.99.0.2", "10.99.0.3"
MTU = 1450


def raw_network(node: hn.Node, peer: hn.Node) -> None:
    """What an admin would type: a bridge, a VXLAN port, flooding to the other node."""
    remove_raw_network(node)
    script = (
        f"ip link add {RAW_BRIDGE} mtu {MTU} type bridge stp_state 0 && "
        f"ip link add {RAW_VXLAN} mtu {MTU} type vxlan id {RAW_VNI} local {node.address} "
        f"dstport 4789 && "
        f"ip link set {RAW_VXLAN} master {RAW_BRIDGE} up && ip link set {RAW_BRIDGE} up && "
        f"bridge fdb append 00:00:00:00:00:00 dev {RAW_VXLAN} dst {peer.address}"
    )
    in_node(node, "sh", "-c", script)


def remove_raw_network(node: hn.Node) -> None:
    for link in (RAW_VXLAN, RAW_BRIDGE):
        in_node(node, "ip", "link", "delete", link, check=False)


def inactive_xml(conn: libvirt.virConnect, name: str) -> str:
    return str(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def console_values(node: hn.Node, dom: str, pattern: str) -> list[Any]:
    return re.findall(pattern, hn.serial_log(node, dom), re.MULTILINE)


def wait_done(node: hn.Node, dom: str, timeout: float) -> None:
    hn.wait_for_serial(node, dom, r"^VF-SENT-DONE", timeout=timeout)


def throughput(node: hn.Node, dom: str) -> list[float]:
    """MiB/s of each timed transfer the sender printed."""
    return [float(m) / float(s) for m, s in console_values(node, dom, r"^VF-SENT (\d+) ([\d.]+)")]


def rtt(node: hn.Node, dom: str) -> float | None:
    found = console_values(node, dom, r"^VF-RTT ([\d.]+)")
    return float(found[0]) if found else None


def raw_twin(template: str, name: str, cmdline: str) -> str:
    """The virtfleet domain as a foreign one on the hand-made bridge, without a filter."""
    root = ET.fromstring(guests.raw_twin_xml(template, name))
    for nic in root.iter("interface"):
        source = nic.find("source")
        if source is not None:
            source.set("bridge", RAW_BRIDGE)
        for child in list(nic):
            if child.tag in ("filterref", "target", "alias", "mac"):
                nic.remove(child)
    os_cmdline = root.find("os/cmdline")
    assert os_cmdline is not None
    os_cmdline.text = cmdline
    return ET.tostring(root, encoding="unicode")


def apply(cluster: Cluster, body: dict[str, Any]) -> None:
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(body))


def vm_ip(cluster: Cluster, name: str, namespace: str) -> str:
    def ip() -> str | None:
        nics = status_of(cluster, "vm", name, namespace).get("interfaces") or []
        return next((n.get("ip") for n in nics if n.get("ip")), None)

    return str(guests.wait(ip, 120, 0.5, f"{name}'s address"))


def running_on(cluster: Cluster, name: str, namespace: str) -> Callable[[], str | None]:
    def where() -> str | None:
        status = status_of(cluster, "vm", name, namespace)
        return status.get("nodeName") if status.get("printableStatus") == "Running" else None

    return where


def migrate(cluster: Cluster, namespace: str, vm: str, target: str, tag: str) -> float | None:
    """Live-migrate ``vm`` with a VMMigration; libvirt's downtime (ms) as it reports it."""
    name = f"{vm}-{tag}"
    apply(cluster, migration_manifest(name, namespace, vm, targetNode=target))
    status = guests.wait(
        lambda: (
            (s := status_of(cluster, "vmmig", name, namespace)).get("phase")
            in ("Succeeded", "Failed")
            and s
        ),
        240,
        0.5,
        f"migration {name}",
    )
    if status.get("phase") != "Succeeded":
        raise guests.BenchError(f"migration {name} failed: {status}")
    guests.wait(running_on(cluster, vm, namespace), 60, 0.5, f"{vm} Running on {target}")
    downtime = status.get("downtimeMs")
    return float(downtime) if downtime is not None else None


def migrate_rounds(
    cluster: Cluster, namespace: str, vm: str, rounds: int, a: hn.Node, b: hn.Node
) -> list[float]:
    out: list[float] = []
    for i in range(rounds):
        here = running_on(cluster, vm, namespace)()
        target = b if here == a.name else a
        downtime = migrate(cluster, namespace, vm, target.name, f"m{i}")
        if downtime is not None:
            out.append(downtime)
    return out


def run(ctx: BenchContext) -> ScenarioResult:
    mib, sends = (8, 2) if ctx.small else (32, 5)
    rounds = 1 if ctx.small else 3
    cluster = Cluster(state_dir=ctx.state_dir, env=ctx.env, nodes=hn.nodes_from_env(ctx.env))
    a, b = cluster.nodes[0], cluster.nodes[1]
    namespace = guests.unique("bench-net")
    network = f"{namespace}-net"
    kubectl(cluster, "create", "namespace", namespace)
    apply(
        cluster,
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMNetwork",
            "metadata": {"name": network},
            "spec": {"namespaces": [namespace], "subnet": "10.88.0.0/24"},
        },
    )
    nic = [{"name": "net", "type": "network", "network": network}]
    raw_names = (f"{namespace}-raw-sink", f"{namespace}-raw-sender")
    conns = {node.name: libvirt.open(node.uri) for node in (a, b)}
    notes: list[str] = []
    try:
        apply(cluster, vm_manifest("sink", namespace, nodeName=a.name, interfaces=nic,
                                   cmdline=guest_cmdline(sink=PORT)))  # fmt: skip
        sink_ip = vm_ip(cluster, "sink", namespace)
        hn.wait_for_serial(a, domain_name(namespace, "sink"), rf"^VF-SINK {PORT}", timeout=120)
        send = f"{sink_ip}:{PORT}:{mib}:{sends}"
        apply(cluster, vm_manifest("sender", namespace, nodeName=b.name, interfaces=nic,
                                   cmdline=guest_cmdline(send=send, rtt=sink_ip)))  # fmt: skip
        sender = domain_name(namespace, "sender")
        wait_done(b, sender, 300)
        ours, ours_rtt = throughput(b, sender), rtt(b, sender)

        # The same two domains on the hand-made bridge + VXLAN.
        raw_network(a, b)
        raw_network(b, a)
        sink_xml = raw_twin(
            conns[a.name]
            .lookupByName(domain_name(namespace, "sink"))
            .XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
            raw_names[0],
            guest_cmdline(static_ip=f"{RAW_SINK}/24", sink=PORT),
        )
        sender_xml = raw_twin(
            inactive_xml(conns[b.name], sender),
            raw_names[1],
            guest_cmdline(
                static_ip=f"{RAW_SENDER}/24",
                send=f"{RAW_SINK}:{PORT}:{mib}:{sends}",
                rtt=RAW_SINK,
            ),
        )
        conns[a.name].defineXML(sink_xml).create()
        hn.wait_for_serial(a, raw_names[0], rf"^VF-SINK {PORT}", timeout=120)
        conns[b.name].defineXML(sender_xml).create()
        wait_done(b, raw_names[1], 300)
        raw, raw_rtt = throughput(b, raw_names[1]), rtt(b, raw_names[1])
        for node, name in ((a, raw_names[0]), (b, raw_names[1])):
            guests.raw_remove(conns[node.name], [name])

        # Downtime: the sink (VMNetwork NIC) and a guest without NIC, migrated alike.
        kubectl(cluster, "delete", "vm", "sender", "-n", namespace, "--wait=true")
        apply(cluster, vm_manifest("bare", namespace, nodeName=a.name))
        guests.wait(running_on(cluster, "bare", namespace), 120, 0.5, "bare Running")
        with_net = migrate_rounds(cluster, namespace, "sink", rounds, a, b)
        without = migrate_rounds(cluster, namespace, "bare", rounds, a, b)
    finally:
        for node, name in ((a, raw_names[0]), (b, raw_names[1])):
            guests.raw_remove(conns[node.name], [name])
        for node in (a, b):
            remove_raw_network(node)
            conns[node.name].close()
        kubectl(cluster, "delete", "vm", "--all", "-n", namespace, "--wait=true",
                "--timeout=180s")  # fmt: skip
        kubectl(cluster, "delete", "vmnetwork", network, "--wait=true", "--timeout=120s")
        kubectl(cluster, "delete", "namespace", namespace, "--wait=false")
    ours_p50, raw_p50 = statistics.median(ours), statistics.median(raw)
    notes.append(
        f"{sends} transfers of {mib} MiB per side over fresh TCP connections, timed by the "
        "sending guest (TCG guests: low absolute figures, the ratio is what counts); RTT: "
        "20 pings 0.2 s apart. Raw: a bridge + VXLAN (VNI 99, MTU 1450) made with ip on "
        "each node, the same domains without nwfilter, static addresses."
    )
    notes.append(
        f"downtime (libvirt's, ms): with a VMNetwork NIC {with_net}, without a NIC {without}"
    )
    rows = [
        Row(
            "VM→VM throughput across nodes (p50)",
            round(ours_p50, 2),
            "MiB/s",
            round(raw_p50, 2),
            "≥ 0.9× raw",
            ours_p50 >= 0.9 * raw_p50,
        ),
        Row(
            "VM→VM ping RTT across nodes (avg)",
            ours_rtt,
            "ms",
            raw_rtt,
            "≤ 1.2× raw",
            None if ours_rtt is None or not raw_rtt else ours_rtt <= 1.2 * raw_rtt,
        ),
    ]
    if with_net and without:
        net_p50, bare_p50 = statistics.median(with_net), statistics.median(without)
        rows.append(
            Row(
                "migration downtime with a VMNetwork NIC (p50)",
                net_p50,
                "ms",
                bare_p50,
                "vs the same migration without a NIC",
                None,
            )
        )
    return ScenarioResult(
        name="vmnetwork",
        title="VMNetwork: VM-to-VM across nodes vs a hand-made bridge + VXLAN; migration downtime",
        rows=rows,
        samples={"virtfleet": ours, "raw bridge + VXLAN": raw},
        sample_unit="MiB/s",
        notes=notes,
    )
