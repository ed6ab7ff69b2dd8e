"""Chaos with whole nodes: seeded power-offs and partitions of either node under HA VMs.

Each round takes the node holding most of the VMs down — powered off (every process
SIGKILLed, the agent too) or cut off (its agent killed; its QEMUs run until its
watchdog resets them) — keeps it down for a seeded time (sometimes shorter than the
fence deadline, so the node comes back unfenced, sometimes longer, so its VMs fail
over), brings it back, and waits until every VM runs again.
``$VIRTFLEET_FAILOVER_CHAOS_ROUNDS`` rounds (default 2, the CI variant; the kinds alternate,
so both are in every run; the seed is printed,
``VIRTFLEET_CHAOS_SEED`` replays it).

Invariants, checked from the outside all along:

* **never two running copies**: a sampler lists both nodes' domains every 0.3 s; a VM's
  domain active on both at once fails the test;
* **never two writers**: each guest writes (fsyncs) every increment of a counter on its
  shared disk before printing it; across every copy on every node no value may be
  printed twice (two writers would both print the value after the one they read);
* **no VM lost**: every VM runs at the end, exactly once, with its disk.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from harness import nodes as hn
from harness import operators
from harness.failover import power_off, power_on, restore_nodes
from harness.guest import guest_cmdline
from harness.testing import Cluster, domain_name, vm_manifest, wait_for

COUNTER = re.compile(r"^VF-COUNTER (\d+)\s*$", re.MULTILINE)
BOOT = re.compile(r"^VF-COUNTER-BOOT (\d+)\s*$", re.MULTILINE)
SHARED_DATA = [{"name": "data", "size": "16Mi", "source": {"blank": {}}, "pool": hn.SHARED_POOL}]
#: Down times: shorter than the fence deadline (22 s with the harness defaults), or longer.
DOWN_SHORT_S = (1.0, 6.0)
KINDS = ("power-off", "cut-off")
DOWN_LONG_S = (30.0, 35.0)


@dataclass(eq=False)  # a Thread must stay hashable
class Sampler(threading.Thread):
    """Both nodes' running domains, every 0.3 s; records any domain running twice."""

    cluster: Cluster
    domains: set[str]
    stop: threading.Event = field(default_factory=threading.Event)
    doubles: list[str] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="double-copy-sampler", daemon=True)

    def run(self) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        while not self.stop.is_set():
            running: dict[str, list[str]] = {}
            for node in self.cluster.nodes:
                try:
                    conn = libvirt.open(node.uri)
                except libvirt.libvirtError:
                    continue  # powered off: nothing runs there
                try:
                    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                        if dom.name() in self.domains:
                            running.setdefault(dom.name(), []).append(node.name)
                except libvirt.libvirtError:
                    pass  # libvirtd going down mid-call: the next sample sees
                finally:
                    conn.close()
            self.samples += 1
            for dom, where in running.items():
                if len(where) > 1:
                    self.doubles.append(f"{dom} running on {where}")
            time.sleep(0.3)


@pytest.fixture(autouse=True)
def nodes_healthy_after(system: Cluster) -> Iterator[None]:
    """The tests after these find every node back and out of its damping."""
    yield
    restore_nodes(system)


def values(node: hn.Node, dom: str) -> list[int]:
    return [int(m.group(1)) for m in COUNTER.finditer(hn.serial_log(node, dom))]


def check_one_writer(system: Cluster, name: str, dom: str) -> None:
    """Each increment of the disk counter is written (fsynced) before it is printed, and a
    copy that boots reads the last one written: with one writer at a time every value is
    printed once, across all copies on all nodes. Two writers would both print the value
    after the one they read; a copy that booted from a stale disk would print values again."""
    printed = [v for node in system.nodes for v in values(node, dom)]
    repeated = sorted({v for v in printed if printed.count(v) > 1})
    assert not repeated, f"{name}: counter values printed twice (two writers): {repeated[:10]}"


def test_nodes_powered_off_and_cut_off_never_run_a_vm_twice(
    system: Cluster, namespace: str
) -> None:
    seed = int(os.environ.get("VIRTFLEET_CHAOS_SEED") or time.time() * 1000) % 2**31
    rounds = int(os.environ.get("VIRTFLEET_FAILOVER_CHAOS_ROUNDS") or 2)
    rng = random.Random(seed)
    print(f"\n[failover-chaos] seed {seed} (replay: VIRTFLEET_CHAOS_SEED={seed}), {rounds} rounds")
    names = [f"ha-{i}" for i in range(3)]
    for name in names:
        system.apply(
            vm_manifest(
                name, namespace, cmdline=guest_cmdline(counter=True), disks=SHARED_DATA,
                highAvailability="Restart",
            )
        )  # fmt: skip
    doms = {domain_name(namespace, n): n for n in names}

    def all_running() -> bool:
        for name in names:
            st = system.get("vm", name, namespace).get("status") or {}
            if st.get("printableStatus") != "Running":
                return False
        return True

    def all_counting() -> bool:
        """Every VM's current copy counts: the newest value of all its copies, printed on
        its node after its last boot there (a stale read of an older copy's lines would
        make a round look finished before the guest booted)."""
        for dom, name in doms.items():
            where = (system.get("vm", name, namespace).get("status") or {}).get("nodeName")
            if not where:
                return False
            text = hn.serial_log(system.node(where), dom)
            boots = list(BOOT.finditer(text))
            here = (
                [int(m.group(1)) for m in COUNTER.finditer(text, boots[-1].end())] if boots else []
            )
            everywhere = [v for n in system.nodes for v in values(n, dom)]
            if not here or here[-1] < max(everywhere):
                return False
        return True

    wait_for(all_running, 120, 1.0, "every HA VM Running")
    wait_for(all_counting, 120, 1.0, "every HA VM counting")
    sampler = Sampler(system, set(doms))
    sampler.start()
    failovers = 0
    first_kind = rng.randrange(len(KINDS))
    try:
        for round_no in range(rounds):
            # The node holding most of the VMs (ties: a seeded choice), so rounds fail over.
            held = [system.get("vm", n, namespace)["status"]["nodeName"] for n in names]
            most = max(held.count(n.name) for n in system.nodes)
            node = rng.choice([n for n in system.nodes if held.count(n.name) == most])
            kind = KINDS[(round_no + first_kind) % len(KINDS)]
            down = rng.uniform(*(DOWN_LONG_S if rng.random() < 0.6 else DOWN_SHORT_S))
            if kind == "power-off":
                power_off(system, node)
            else:
                operators.kill(system.state_dir, f"agent-{node.name}")
            time.sleep(down)
            if kind == "power-off":
                power_on(system, node)
            else:
                operators.start_agent(system.state_dir, system.env, node)
            wait_for(all_running, 180, 1.0, f"every HA VM Running after round {round_no}")
            wait_for(all_counting, 120, 1.0, f"every HA VM counting after round {round_no}")
            for dom, name in doms.items():
                check_one_writer(system, name, dom)
            failovers = sum(
                int(
                    (system.get("vm", n, namespace)["status"].get("failover") or {}).get("count")
                    or 0
                )
                for n in names
            )
            print(
                f"[failover-chaos] round {round_no}: {kind} {node.name} for {down:.1f}s; "
                f"failovers so far {failovers}"
            )
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
    assert not sampler.doubles, sampler.doubles[:5]
    assert sampler.samples > 50
    # No VM lost, each running exactly once, counting on from its disk.
    for dom, name in doms.items():
        where = system.node(system.get("vm", name, namespace)["status"]["nodeName"])
        last = max(v for n in system.nodes for v in values(n, dom))
        hn.wait_for_serial(where, dom, rf"^VF-COUNTER {last + 2}\s*$", timeout=60)
        for other in system.nodes:
            if other.name != where.name:
                assert dom not in _active(other), f"{name} also runs on {other.name}"
    print(f"[failover-chaos] {sampler.samples} samples, no double copy; {failovers} failovers")


def _active(node: hn.Node) -> list[str]:
    import libvirt

    conn = libvirt.open(node.uri)
    try:
        return [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    finally:
        conn.close()
