"""What must hold after chaos, checked only from the outside: kubectl, libvirt, logs.

:func:`violations` returns one line per broken invariant (empty when all hold). The
liveness invariants (convergence, cleanup) need time after the chaos stops, so the test
polls it until empty or a generous timeout; the safety invariants (never on two nodes,
no spec written by the operator, restores and migrations acted at most once) cannot
heal and are reported by the same call.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import libvirt

from harness import nodes as hn
from harness.chaos import Workload
from harness.guest import BOOT_MARKER
from harness.testing import Cluster, condition, domain_name

KINDS = ("vm", "vmsnapshot", "vmrestore", "vmmigration")
WANTED = {"Always": ("Running", "running"), "Halted": ("Stopped", "shut off")}
FINAL = {
    "vmsnapshot": ("Ready", "Failed"),
    "vmrestore": ("Succeeded", "Failed"),
    "vmmigration": ("Succeeded", "Failed"),
}
UPTIME = re.compile(rf"^(?:VF-UPTIME (\d+(?:\.\d+)?)|.*({BOOT_MARKER}))\s*$", re.MULTILINE)
#: A guest's uptime going back by more than this (without a boot) is a memory revert.
JUMP_BACK_S = 2.0
_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_SHUTDOWN: "in shutdown",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}


@dataclass
class Domain:
    node: str
    name: str
    uuid: str
    state: str
    snapshots: list[str] = field(default_factory=list)


def domains(node: hn.Node, prefix: str) -> list[Domain]:
    """Every domain of the namespace on the node, with its libvirt snapshots."""
    conn = libvirt.open(node.uri)
    try:
        found = []
        for dom in conn.listAllDomains():
            if not dom.name().startswith(prefix):
                continue
            state = _STATES.get(dom.state()[0], str(dom.state()[0]))
            found.append(
                Domain(node.name, dom.name(), dom.UUIDString(), state, dom.snapshotListNames())
            )
        return found
    finally:
        conn.close()


def objects(cluster: Cluster, namespace: str) -> dict[str, dict[str, dict[str, Any]]]:
    """kind → name → object, for every virtfleet kind in the namespace."""
    out = cluster.kubectl("get", ",".join(KINDS), "-n", namespace, "-o", "json").stdout
    result: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
    plural = {
        "VirtualMachine": "vm",
        "VMSnapshot": "vmsnapshot",
        "VMRestore": "vmrestore",
        "VMMigration": "vmmigration",
    }
    for item in json.loads(out)["items"]:
        result[plural[item["kind"]]][item["metadata"]["name"]] = item
    return result


def volume_files(cluster: Cluster) -> list[tuple[str, str]]:
    """(where, file name) of every volume in the nodes' local pools and the shared pool."""
    found = [
        (node.name, path.name)
        for node in cluster.nodes
        for path in node.pool_dir(hn.LOCAL_POOL).glob("*")
    ]
    shared = cluster.nodes[0].pool_dir(hn.SHARED_POOL)
    return found + [("shared", path.name) for path in shared.glob("*")]


def revert_jumps(log: str) -> int:
    """How often the guest's uptime went back without a boot in between (memory reverts)."""
    jumps, last = 0, None
    for match in UPTIME.finditer(log):
        if match.group(2):
            last = None
            continue
        value = float(match.group(1))
        if last is not None and value < last - JUMP_BACK_S:
            jumps += 1
        last = value
    return jumps


def incoming_starts(node: hn.Node, dom: str) -> int:
    """QEMU processes started for an incoming migration of ``dom`` on ``node`` (its log)."""
    return _qemu_starts_with(node, dom, "-incoming")


def loadvm_starts(node: hn.Node, dom: str) -> int:
    """QEMU processes libvirt started to revert ``dom`` to a memory snapshot (``-loadvm``).

    For the report: the reverts the guest cannot always show. A snapshot taken while the
    guest still booted (the workload snapshots new VMs) brings back a booting guest,
    whose log then reads like a reboot, not like a jump back of its uptime. Not an
    "at most once" count: a libvirtd killed during a revert kills the ``-loadvm`` QEMU it
    was starting when it comes back ("shutting down, reason=daemon"), and the agent
    rightly reverts again, as the restore marker says the revert never completed (the
    guest's uptime is what tells a second revert of a guest that ran).
    """
    return _qemu_starts_with(node, dom, "-loadvm")


def _qemu_starts_with(node: hn.Node, dom: str, argument: str) -> int:
    try:
        text = (node.qemu_log_dir / f"{dom}.log").read_text(errors="replace")
    except FileNotFoundError:
        return 0
    # libvirt logs each QEMU command line one argument per line: ``-incoming defer \``.
    return sum(1 for line in text.splitlines() if line.lstrip().startswith(f"{argument} "))


def spec_writers(obj: dict[str, Any]) -> list[str]:
    """Field managers other than kubectl that own a field of ``spec``."""
    return [
        entry.get("manager", "?")
        for entry in obj["metadata"].get("managedFields") or []
        if entry.get("subresource") != "status"
        and "f:spec" in (entry.get("fieldsV1") or {})
        and not str(entry.get("manager", "")).startswith("kubectl")
    ]


def violations(cluster: Cluster, workload: Workload) -> list[str]:
    ns = workload.namespace
    found: list[str] = []
    objs = objects(cluster, ns)
    vms = objs["vm"]
    doms = list(itertools.chain.from_iterable(domains(node, f"{ns}_") for node in cluster.nodes))

    # Every object: no spec written by the operator; not stuck in deletion.
    for kind, items in objs.items():
        for name, obj in items.items():
            if writers := spec_writers(obj):
                found.append(f"{kind}/{name}: spec written by {writers}")
            if obj["metadata"].get("deletionTimestamp"):
                finalizers = obj["metadata"].get("finalizers")
                found.append(f"{kind}/{name}: still deleting, finalizers {finalizers}")
    for kind, name in workload.deleted:
        if name in objs[kind]:
            found.append(f"{kind}/{name}: deleted by the workload but still there")
    # Snapshots, restores and migrations reach a final phase — except a snapshot or
    # restore of a VM that no longer exists (deleted before it was placed, so nothing
    # owned it): that one waits for a VM of that name, and must say so.
    for kind, phases in FINAL.items():
        for name, obj in objs[kind].items():
            phase = (obj.get("status") or {}).get("phase")
            if phase in phases:
                continue
            vm_gone = (obj.get("spec") or {}).get("vmName") not in vms
            waiting = condition(obj, "Ready") or {}
            if (
                kind != "vmmigration"
                and vm_gone
                and phase == "Pending"
                and waiting.get("reason") == "VMNotFound"
            ):
                continue
            found.append(f"{kind}/{name}: phase {phase}, not one of {phases}")

    # Every VM converges to its spec, on one node only.
    for record in workload.vms.values():
        found_vm = vms.get(record.name)
        if found_vm is None:
            if not record.deleted:
                found.append(f"vm/{record.name}: gone, but never deleted")
            continue
        obj = found_vm
        spec, status = obj["spec"], obj.get("status") or {}
        if not record.uncertain and (
            spec.get("runStrategy") != record.run_strategy
            or spec["memory"]["size"] != record.memory
        ):
            found.append(
                f"vm/{record.name}: spec {spec.get('runStrategy')}/{spec['memory']['size']}, "
                f"the workload wrote {record.run_strategy}/{record.memory}"
            )
        printable, state = WANTED[spec.get("runStrategy", "Always")]
        ready = condition(obj, "Ready")
        node = status.get("nodeName")
        if status.get("printableStatus") != printable:
            found.append(f"vm/{record.name}: {status.get('printableStatus')}, not {printable}")
        if status.get("observedGeneration") != obj["metadata"]["generation"]:
            found.append(f"vm/{record.name}: generation not observed")
        if ready is None or ready["status"] != "True":
            found.append(f"vm/{record.name}: Ready is {ready and ready['status']}")
        if record.node is not None and node != record.node:
            found.append(f"vm/{record.name}: on {node}, pinned to {record.node}")
        dom = domain_name(ns, record.name)
        where = [d for d in doms if d.name == dom]
        if [d.node for d in where] != [node]:
            homes = [f"{d.node} ({d.state})" for d in where]
            found.append(f"vm/{record.name}: status on {node}, domain on {homes}")
        for d in where:
            if d.node == node and d.state != state:
                found.append(f"vm/{record.name}: domain {d.state} on {d.node}, want {state}")

    # Nothing without an owner: domains, volumes, libvirt snapshots.
    live_uids = {obj["metadata"]["uid"]: name for name, obj in vms.items()}
    for d in doms:
        owner = live_uids.get(d.uuid)
        if owner is None or domain_name(ns, owner) != d.name:
            found.append(f"domain {d.name} ({d.uuid}) on {d.node}: no VirtualMachine owns it")
            continue
        owned = {
            (s.get("status") or {}).get("snapshotName")
            for s in objs["vmsnapshot"].values()
            if s["spec"].get("vmName") == owner
        }
        for snap in d.snapshots:
            if snap not in owned:
                found.append(f"libvirt snapshot {snap} of {d.name} on {d.node}: no VMSnapshot")
    ours = {r.uid for r in workload.vms.values() if r.uid}
    for pool_of, filename in volume_files(cluster):
        uid = filename[:36]
        if uid in ours and uid not in live_uids:
            found.append(f"volume {filename} ({pool_of}): its VirtualMachine is gone")

    # Restores and migrations acted at most once, as the guests and QEMU logs tell.
    nodes_by_name = {n.name: n for n in cluster.nodes}
    for record in workload.vms.values():
        dom = domain_name(ns, record.name)
        if record.role == "snap":
            jumps = revert_jumps(hn.serial_log(nodes_by_name["node-a"], dom))
            if jumps > len(record.restores):
                found.append(
                    f"vm/{record.name}: {jumps} memory reverts for {len(record.restores)} restores"
                )
        for node in cluster.nodes:
            starts = incoming_starts(node, dom)
            allowed = sum(1 for _, target in record.migrations if target == node.name)
            if starts > allowed:
                found.append(
                    f"vm/{record.name}: {starts} incoming migrations on {node.name}, "
                    f"{allowed} VMMigrations targeted it"
                )
    return found


def acted(cluster: Cluster, workload: Workload) -> dict[str, int]:
    """How many restores reverted a guest and migrations moved one (for the report)."""
    snap_domains = [
        domain_name(workload.namespace, r.name) for r in workload.vms.values() if r.role == "snap"
    ]
    node_a = cluster.node("node-a")
    reverts = sum(revert_jumps(hn.serial_log(node_a, dom)) for dom in snap_domains)
    loads = sum(loadvm_starts(node_a, dom) for dom in snap_domains)
    moves = sum(
        incoming_starts(node, domain_name(workload.namespace, r.name))
        for r in workload.vms.values()
        for node in cluster.nodes
    )
    return {
        "memory reverts seen (uptime back)": reverts,
        "QEMU starts to revert (-loadvm)": loads,
        "incoming migrations seen": moves,
    }


def evidence(cluster: Cluster, problems: list[str], per_object: int = 40) -> list[str]:
    """The operators' last log lines about each object a violation names: what CI keeps."""
    names = {m.group(1) for line in problems if (m := re.match(r"^\w+/([\w.-]+):", line))}
    out: list[str] = []
    for name in sorted(names):
        pattern = re.compile(rf'"{re.escape(name)}"')
        for log in sorted((cluster.state_dir / "operators").glob("*.log")):
            lines = [
                line.rstrip()
                for line in log.read_text(errors="replace").splitlines()
                if pattern.search(line)
            ]
            out.extend(f"{log.stem}: {line}" for line in lines[-per_object:])
    return out


#: The agent's Ready reason while libvirtd keeps a domain's job lock (agent/driver.py).
JOB_STUCK = "HypervisorJobStuck"


@dataclass
class StuckJobOperator:
    """What the docs tell an operator to do when a VM says ``HypervisorJobStuck``.

    libvirt 9 keeps a job without owner when libvirtd is killed while it starts a
    domain or reverts a snapshot (the chaos does that); every later call on the domain
    then times out, and virtfleet says so on the VM. The message's remedies, each tried
    once a VM has said it for ``patience`` seconds since the last one:

    1. restart libvirtd on its node (clears it when QEMU died with the job);
    2. kill the domain's QEMU (QEMU survived: libvirtd reconnected and kept the job);
    3. no QEMU at all (libvirtd died while it forked one; the status file says
       ``pid='0'``, async job ``start``, and every restart restores the job): stop
       libvirtd, remove the status file, start it (seed 1284366246: restarts and kills
       never cleared it).

    A VM reads otherwise between its reconcile attempts (each one waits ~30 s for the
    stop and ~30 s for the lock before it says the reason again) and while libvirtd
    restarts: only a VM that is Ready again, or has not said it for ``grace`` seconds
    (longer than such a cycle), is forgotten. Forgetting it sooner restarted libvirtd
    again and again and never escalated (seeds 1131364337, 1281408029: 3 restarts, no kill).
    """

    cluster: Cluster
    namespace: str
    patience: float = 45.0
    grace: float = 90.0
    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    #: Remedies tried per VM while it kept saying it (0 none, 1 restart, 2 kill, 3 forget).
    tried: dict[str, int] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    qemu_kills: Counter[str] = field(default_factory=Counter)
    status_files_removed: Counter[str] = field(default_factory=Counter)

    def step(self, now: float) -> None:
        stuck, healthy = {}, set()
        for name, vm in objects(self.cluster, self.namespace)["vm"].items():
            ready = condition(vm, "Ready") or {}
            node = (vm.get("status") or {}).get("nodeName")
            if ready.get("reason") == JOB_STUCK and node:
                stuck[name] = str(node)
            elif ready.get("status") == "True":
                healthy.add(name)
        for name in stuck:
            self.last_seen[name] = now
            self.first_seen.setdefault(name, now)
        forget = {n for n, seen in self.last_seen.items() if now - seen > self.grace}
        for name in forget | (healthy & set(self.last_seen)):
            del self.last_seen[name]
            self.first_seen.pop(name, None)
            self.tried.pop(name, None)
        due = sorted(n for n in stuck if now - self.first_seen[n] >= self.patience)
        first = [n for n in due if self.tried.get(n, 0) % 3 == 0]
        for name in due:
            self.first_seen[name] = now
            tried = self.tried.get(name, 0) % 3
            node = self._node(stuck[name])
            dom = domain_name(self.namespace, name)
            if tried == 1 and hn.kill_qemu(node, dom):
                print(f"[chaos] operator: {name} still says {JOB_STUCK}; killed its QEMU")
                self.qemu_kills[node.name] += 1
                self.tried[name] = 2
            elif tried in (1, 2):
                print(f"[chaos] operator: {name} still says {JOB_STUCK}, no QEMU left to kill; "
                      "removing its status file with libvirtd stopped")  # fmt: skip
                hn.forget_dead_domain(node, dom)
                self.status_files_removed[node.name] += 1
                self.tried[name] = 3
        for node_name in sorted({stuck[n] for n in first}):
            print(f"[chaos] operator: VMs on {node_name} say {JOB_STUCK}; restarting its libvirtd")
            hn.restart_libvirtd(self._node(node_name))
            self.restarts[node_name] += 1
            for name in first:
                if stuck[name] == node_name:
                    self.tried[name] = 1

    def _node(self, name: str) -> hn.Node:
        return next(n for n in self.cluster.nodes if n.name == name)
