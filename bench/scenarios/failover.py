"""Failover time: a node powered off → its HA VM's guest boots on the other node.

One counting guest with ``highAvailability: Restart`` on a shared disk. Each round powers
off the node it runs on (libvirtd, every QEMU and the agent SIGKILLed at once), measures
until the guest's boot marker appears on the other node, powers the node on again and
waits until it is back (stale copy removed, damping over), then goes the other way.

The floor is what a script could do at best with the same safety: wait the same fencing
delay (the node's self-fence time + its watchdog timeout + the controller's margin, as
the node declares them in its Lease), then ``virsh define`` + ``start`` of the same
domain on the other node until its boot marker. Everything above that floor is
virtfleet's own cost: detection polling, placement, the agent's start, the API writes.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import time
from typing import Any

import libvirt

from bench import guests
from bench.result import BenchContext, Row, ScenarioResult
from bench.scenarios.migration_snapshot import raw_twin, virsh
from harness import nodes as hn
from harness.failover import power_off, power_on
from harness.guest import BOOT_MARKER, guest_cmdline
from harness.testing import Cluster, domain_name, domains, vm_manifest

TARGET_S = 30.0
#: The controller's default fence margin (ControllerSettings.fence_margin).
MARGIN_S = 2.0
SHARED_DATA = [{"name": "data", "size": "16Mi", "source": {"blank": {}}, "pool": hn.SHARED_POOL}]


def kubectl(cluster: Cluster, *args: str, input: str | None = None) -> str:
    return subprocess.run(
        ["kubectl", *args],
        input=input,
        capture_output=True,
        text=True,
        check=True,
        timeout=180,
        # kubectl keeps its discovery cache under $HOME: never the working directory.
        env={**os.environ, **cluster.env},
    ).stdout


def get(cluster: Cluster, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    ns = ["-n", namespace] if namespace else []
    return dict(json.loads(kubectl(cluster, "get", kind, name, *ns, "-o", "json")))


def status_of(
    cluster: Cluster, kind: str, name: str, namespace: str | None = None
) -> dict[str, Any]:
    status = get(cluster, kind, name, namespace).get("status") or {}
    return dict(status) if isinstance(status, dict) else {}


def health(cluster: Cluster, node: str) -> str | None:
    value = status_of(cluster, "vmhost", node).get("health") or {}
    return str(value.get("state")) if isinstance(value, dict) else None


def healthy(cluster: Cluster, node: str) -> bool:
    return health(cluster, node) == "Healthy"


def gone(node: hn.Node, dom: str) -> bool:
    return dom not in domains(node)


def running_node(cluster: Cluster, name: str, namespace: str) -> str | None:
    status = status_of(cluster, "vm", name, namespace)
    return str(status["nodeName"]) if status.get("printableStatus") == "Running" else None


def fencing_delay(cluster: Cluster, node: str) -> float:
    fencing = status_of(cluster, "vmhost", node).get("fencing") or {}
    assert isinstance(fencing, dict)
    return (
        float(fencing["selfFenceAfterSeconds"])
        + float(fencing["watchdogTimeoutSeconds"])
        + MARGIN_S
    )


def raw_floor_boot(
    cluster: Cluster, source_xml: str, node: hn.Node, namespace: str, rounds: int
) -> list[float]:
    """``virsh define`` + ``start`` of the same domain (own blank disk) until its boot marker."""
    name = f"{namespace}-raw"
    volume = f"{name}.qcow2"
    virsh(node, "vol-create-as", hn.LOCAL_POOL, volume, "16M", "--format", "qcow2")
    path = f"{hn.POOL_PATHS[hn.LOCAL_POOL]}/{volume}"
    conn = libvirt.open(node.uri)
    times = []
    try:
        xml = raw_twin(source_xml, name, path)
        for _ in range(rounds):
            offset = len(hn.serial_log(node, name))
            started = time.monotonic()
            conn.defineXML(xml).create()
            hn.wait_for_serial(node, name, BOOT_MARKER, timeout=60, after=offset)
            times.append(time.monotonic() - started)
            guests.raw_remove(conn, [name])
    finally:
        guests.raw_remove(conn, [name])
        conn.close()
        virsh(node, "vol-delete", volume, "--pool", hn.LOCAL_POOL)
    return times


def run(ctx: BenchContext) -> ScenarioResult:
    rounds = 1 if ctx.small else 10
    cluster = Cluster(state_dir=ctx.state_dir, env=ctx.env, nodes=hn.nodes_from_env(ctx.env))
    namespace = guests.unique("bench-fo")
    kubectl(cluster, "create", "namespace", namespace)
    name = "phoenix"
    dom = domain_name(namespace, name)
    manifest = vm_manifest(
        name, namespace, cmdline=guest_cmdline(counter=True), disks=SHARED_DATA,
        highAvailability="Restart",
    )  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(manifest))
    notes: list[str] = []
    failover: list[float] = []
    try:
        where = guests.wait(
            lambda: (
                (s := status_of(cluster, "vm", name, namespace)).get("printableStatus") == "Running"
                and s.get("nodeName")
            ),
            120,
            0.5,
            "the HA VM Running",
        )
        hn.wait_for_serial(cluster.node(str(where)), dom, BOOT_MARKER, timeout=90)
        for i in range(rounds):
            src = cluster.node(str(status_of(cluster, "vm", name, namespace)["nodeName"]))
            dst = next(n for n in cluster.nodes if n.name != src.name)
            guests.wait(
                functools.partial(healthy, cluster, dst.name),
                120,
                0.5,
                f"{dst.name} Healthy (damping over)",
            )
            offset = len(hn.serial_log(dst, dom))
            cut = power_off(cluster, src)
            try:
                hn.wait_for_serial(dst, dom, BOOT_MARKER, timeout=120, after=offset)
                failover.append(time.monotonic() - cut)
                print(f"bench failover: round {i}: {src.name} → {dst.name} {failover[-1]:.1f}s")
            finally:
                power_on(cluster, src)  # never leave a node off for what runs next
            guests.wait(functools.partial(gone, src, dom), 120, 0.5, "the stale copy gone")
        delay = fencing_delay(cluster, cluster.nodes[0].name)
        here = cluster.node(str(status_of(cluster, "vm", name, namespace)["nodeName"]))
        other = next(n for n in cluster.nodes if n.name != here.name)
        template = virsh(here, "dumpxml", "--inactive", dom)
        raw_boot = raw_floor_boot(cluster, template, other, namespace, 3 if not ctx.small else 1)
    finally:
        # The VM goes first, and its domain with it, before the next scenario (and the
        # smoke test's check that nothing of the benchmark is left on the nodes).
        kubectl(cluster, "delete", "vm", name, "-n", namespace, "--wait=true", "--timeout=120s")
        for node in cluster.nodes:
            guests.wait(functools.partial(gone, node, dom), 120, 0.5, f"{dom} gone")
        kubectl(cluster, "delete", "namespace", namespace, "--wait=false")
    floor = delay + statistics.median(raw_boot)
    p50 = statistics.median(failover)
    worst = max(failover)
    notes.append(
        f"{len(failover)} power-offs; fencing delay {delay:g}s (self-fence + watchdog + margin, "
        f"as the nodes declare them); raw define+start → boot marker "
        f"{statistics.median(raw_boot):.2f}s (median of {len(raw_boot)})"
    )
    return ScenarioResult(
        name="failover",
        title="Failover: node power-off → guest boot marker on the other node",
        rows=[
            Row(
                "failover p50",
                round(p50, 2),
                "s",
                round(floor, 2),
                f"≤ {TARGET_S:g} s",
                p50 <= TARGET_S,
            ),
            Row(
                "failover max",
                round(worst, 2),
                "s",
                round(floor, 2),
                f"≤ {TARGET_S:g} s",
                worst <= TARGET_S,
            ),
        ],
        samples={
            "virtfleet": failover,
            "raw floor (delay + virsh start)": [delay + t for t in raw_boot],
        },
        notes=notes,
    )
