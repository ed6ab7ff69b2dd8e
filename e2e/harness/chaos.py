"""Chaos for the end-to-end suite: a seeded fault injector and a seeded workload.

Both run as threads for a bounded time. Everything random comes from one
``random.Random(seed)`` (each thread gets a child generator drawn from it), so a seed
replays the same *schedule*: the same faults in the same order with the same gaps and
down times, and the same sequence of workload choices (which operation, on which VM) —
while the machine's timing, and so what the cluster answers, differs between runs.

Bounds: one fault at a time (never everything down at once), every component killed is
started again within a few seconds, and the injector waits for a restarted apiserver to
be ready before the next fault.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import libvirt

from harness import controlplane, operators
from harness import nodes as hn
from harness.guest import guest_cmdline
from harness.testing import Cluster, vm_manifest

FAULT_KINDS = ("agent-node-a", "agent-node-b", "controller", "libvirtd-node-a", "apiserver")
#: Seconds between the end of one fault and the next one.
GAP_S = (0.2, 1.0)
#: Seconds a killed component stays down before it is started again.
DOWN_S = (0.5, 1.5)
#: Seconds between two workload operations.
OP_GAP_S = (0.3, 1.2)
#: VMs alive at once (each may run a guest; a migration briefly adds one): ≤ 6 QEMUs.
MAX_LIVE_VMS = 4
#: A memory snapshot must be this old before it is restored, so the revert is visible as
#: a jump back of the guest's uptime.
RESTORE_MIN_AGE_S = 10.0
#: Phases after which a VMMigration or VMRestore holds the VM no more (None: it is gone).
FINISHED = ("Succeeded", "Failed", "Cancelled", None)
DATA_DISK = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]


# restart_libvirtd polls until libvirtd answers; libvirt would print every refusal.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def seed_from_env() -> int:
    """``$VIRTFLEET_CHAOS_SEED`` or a time-based seed (print it to replay the run)."""
    raw = os.environ.get("VIRTFLEET_CHAOS_SEED")
    return int(raw) if raw else int(time.time() * 1000) % 2**31


class FaultInjector(threading.Thread):
    """Kill one component with SIGKILL, keep it down briefly, start it again; repeat."""

    def __init__(self, cluster: Cluster, rng: random.Random, stop: threading.Event) -> None:
        super().__init__(name="chaos-faults", daemon=True)
        self.cluster = cluster
        self.rng = rng
        self.stop = stop
        self.min_faults = 0
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set() or sum(self.counts.values()) < self.min_faults:
            gap = self.rng.uniform(*GAP_S)
            kind = self.rng.choice(FAULT_KINDS)
            down = self.rng.uniform(*DOWN_S)
            time.sleep(gap)
            try:
                self.inject(kind, down)
                self.counts[kind] += 1
            except Exception as exc:  # reported; the test fails on it after restoring all
                self.errors.append(f"{kind}: {exc!r}")
                time.sleep(1.0)

    def inject(self, kind: str, down: float) -> None:
        state = self.cluster.state_dir
        if kind == "apiserver":
            controlplane.kill_apiserver(state)
            time.sleep(down)
            controlplane.start_apiserver(state)
        elif kind.startswith("libvirtd-"):
            # SIGKILL through the node's supervisor (which restarts it: on its own, a dead
            # daemon takes the harness node down); the QEMUs keep running, as in production.
            hn.restart_libvirtd(self.cluster.node(kind.removeprefix("libvirtd-")), crash=True)
        else:
            operators.kill(state, kind, signal.SIGKILL)
            time.sleep(down)
            start_operator(self.cluster, kind)


def start_operator(cluster: Cluster, name: str) -> None:
    if name == "controller":
        operators.start_controller(cluster.state_dir, cluster.env)
    else:
        node = cluster.node(name.removeprefix("agent-"))
        operators.start_agent(cluster.state_dir, cluster.env, node)


def restore_everything(cluster: Cluster) -> None:
    """Whatever the chaos left down is up again: apiserver, libvirtds, every operator."""
    controlplane.start_apiserver(cluster.state_dir)
    for node in cluster.nodes:
        if not (node.root / "run" / "libvirtd.pid").exists():
            hn.restart_libvirtd(node)
    for name in ("controller", *(f"agent-{n.name}" for n in cluster.nodes)):
        if operators.pid_of(cluster.state_dir, name) is None:
            start_operator(cluster, name)


@dataclass
class VmRecord:
    """What the workload did to one VirtualMachine (names are never reused)."""

    name: str
    role: str
    """``snap`` (pinned to node-a; snapshots and restores) or ``move`` (migrations)."""
    uid: str = ""
    run_strategy: str = "Always"
    memory: str = "128Mi"
    node: str | None = None
    deleted: bool = False
    deleted_at: float | None = None
    """When the workload deleted it (monotonic)."""
    uncertain: bool = False
    """A write to it never got an answer: its spec is not checked."""
    snapshots: list[str] = field(default_factory=list)
    restores: list[str] = field(default_factory=list)
    migrations: list[tuple[str, str]] = field(default_factory=list)
    """(VMMigration name, target node)."""


@dataclass
class Request:
    """One snapshot, restore or migration the workload asked for (see chaos_outcomes)."""

    kind: str
    """``vmsnapshot``, ``vmrestore`` or ``vmmigration``."""
    name: str
    vm: str
    quiet: bool
    """Asked for after the last fault (``Workload.faults_over``)."""
    detail: str = ""
    """Snapshots: ``running``/``off``; restores: ``memory``/``disks``; ``Live``/``Offline``."""
    at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)  # a Thread must stay hashable
class Workload(threading.Thread):
    """Creates, updates, deletes, snapshots, restores and migrates VMs in ``namespace``."""

    cluster: Cluster
    namespace: str
    rng: random.Random
    stop: threading.Event
    vms: dict[str, VmRecord] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of every object the workload deleted."""
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    faults_over: threading.Event = field(default_factory=threading.Event)
    """Set by the test once the last fault is repaired: what is asked from then on must
    succeed (the settling period of chaos_outcomes)."""
    _serial: int = 0

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="chaos-workload", daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            time.sleep(self.rng.uniform(*OP_GAP_S))
            op, action = self.choose()
            try:
                done = action()
                self.counts[done or op] += 1
            except KubectlGaveUpError:
                self.failures[op] += 1
            except Exception as exc:  # a bug of the workload itself: the test fails on it
                self.errors.append(f"{op}: {exc!r}")

    # ------------------------------------------------------------------ choosing

    def live(self, role: str | None = None) -> list[VmRecord]:
        return [v for v in self.vms.values() if not v.deleted and role in (None, v.role)]

    def choose(self) -> tuple[str, Callable[[], str | None]]:
        """The next operation; every draw comes from ``rng`` in a fixed order."""
        roll = self.rng.random()
        pick = self.rng.random()
        keep_running = self.rng.random() < 0.7
        live = self.live()
        if len(live) < 2 or (roll < 0.2 and len(live) < MAX_LIVE_VMS):
            role = "snap" if pick < 0.5 else "move"
            return "create", lambda: self.create(role)
        target = live[int(pick * len(live))]
        if roll < 0.45:
            if target.role == "snap" and target.run_strategy == "Always" and keep_running:
                # Mostly keep snapshot VMs running: only then are memory snapshots taken,
                # and only a running guest's uptime shows a revert.
                return "snapshot", lambda: self.snapshot(target)
            return "update", lambda: self.update(target)
        if roll < 0.55:
            return "delete", lambda: self.delete(target)
        if target.role == "snap":
            if roll < 0.75:
                return "snapshot", lambda: self.snapshot(target)
            return "restore", lambda: self.restore(target)
        # A stopped VM moves offline (a live migration of it is refused by design).
        mode = "Live" if target.run_strategy == "Always" else "Offline"
        return "migrate", lambda: self.migrate(target, mode)

    # ------------------------------------------------------------------ operations

    def _fresh_name(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self._serial}"

    def create(self, role: str) -> None:
        name = self._fresh_name(role)
        strategy = "Always" if self.rng.random() < 0.75 else "Halted"
        record = VmRecord(name, role, run_strategy=strategy)
        spec: dict[str, Any] = {"runStrategy": strategy, "disks": DATA_DISK}
        if role == "snap":
            record.node = "node-a"
            spec["nodeName"] = "node-a"
        self.vms[name] = record
        manifest = vm_manifest(name, self.namespace, cmdline=guest_cmdline(), **spec)
        out = self.kubectl("apply", "-o", "json", "-f", "-", input=json.dumps(manifest))
        record.uid = json.loads(out)["metadata"]["uid"]

    def update(self, vm: VmRecord) -> None:
        if vm.run_strategy == "Halted" and self.rng.random() < 0.5:
            memory = "160Mi" if vm.memory == "128Mi" else "128Mi"
            self.patch(vm, {"memory": {"size": memory}})
            vm.memory = memory
            return
        strategy = "Halted" if vm.run_strategy == "Always" else "Always"
        self.patch(vm, {"runStrategy": strategy})
        vm.run_strategy = strategy

    def patch(self, vm: VmRecord, spec: dict[str, Any]) -> None:
        try:
            self.kubectl("patch", "vm", vm.name, "--type=merge", "-p", json.dumps({"spec": spec}))
        except KubectlGaveUpError:
            vm.uncertain = True
            raise

    def delete(self, vm: VmRecord) -> None:
        vm.deleted, vm.deleted_at = True, time.monotonic()
        self.deleted.append(("vm", vm.name))
        self.kubectl("delete", "vm", vm.name, "--ignore-not-found", "--wait=false")

    def snapshot(self, vm: VmRecord) -> None:
        name = self._fresh_name(f"{vm.name}-s")
        vm.snapshots.append(name)
        self._asked("vmsnapshot", name, vm, "running" if vm.run_strategy == "Always" else "off")
        self.apply_object("VMSnapshot", name, {"vmName": vm.name})

    def _asked(self, kind: str, name: str, vm: VmRecord, detail: str) -> None:
        self.requests.append(Request(kind, name, vm.name, self.faults_over.is_set(), detail))

    def restore(self, vm: VmRecord) -> str | None:
        """Restore a Ready snapshot; take one instead when there is none to restore yet, or
        while the VM's last restore runs (a second one would be refused by design:
        ``RestoreInProgress``)."""
        busy = vm.restores and self._phase("vmrestore", vm.restores[-1]) not in FINISHED
        ready = None if busy else self.ready_snapshot(vm)
        if ready is None:
            self.snapshot(vm)
            return "snapshot"
        snapshot, memory = ready
        name = self._fresh_name(f"{vm.name}-r")
        vm.restores.append(name)
        # The guest's memory comes back only if the VM is to run (else: disks only).
        self._asked(
            "vmrestore", name, vm, "memory" if memory and vm.run_strategy == "Always" else "disks"
        )
        self.apply_object("VMRestore", name, {"vmName": vm.name, "snapshotName": snapshot})
        return None

    def migrate(self, vm: VmRecord, mode: str = "Live") -> str | None:
        """Migrate ``vm`` to the other node, unless that would only be refused by design.

        A migration asked while the VM's last one still runs is refused
        (``MigrationInProgress``), and so, for the same reason, is one aimed by a stale
        ``status.nodeName`` (``TargetIsSource``, ``VMNotOnSource``); a live one of a VM not
        running yet is (``VMNotRunning``). Once most migrations were such refusals.
        """
        obj = json.loads(self.kubectl("get", "vm", vm.name, "-o", "json"))
        status = obj.get("status") or {}
        here = status.get("nodeName")
        if not here:
            return "migrate skipped (not placed yet)"
        if vm.migrations and self._phase("vmmigration", vm.migrations[-1][0]) not in FINISHED:
            return "migrate skipped (the last one is not finished)"
        if status.get("printableStatus") != ("Running" if mode == "Live" else "Stopped"):
            return f"migrate skipped ({status.get('printableStatus')}, not settled)"
        target = next(n.name for n in self.cluster.nodes if n.name != here)
        name = self._fresh_name(f"{vm.name}-m")
        vm.migrations.append((name, target))
        self._asked("vmmigration", name, vm, mode)
        self.apply_object(
            "VMMigration", name, {"vmName": vm.name, "targetNode": target, "mode": mode}
        )
        return None

    def _phase(self, kind: str, name: str) -> str | None:
        """The object's phase: "" while it has none yet, None once it is gone."""
        out = self.kubectl(
            "get",
            kind,
            name,
            "--ignore-not-found",
            "-o",
            "jsonpath={.metadata.name}/{.status.phase}",
        )
        return out.strip().partition("/")[2] if out.strip() else None

    def ready_snapshot(self, vm: VmRecord) -> tuple[str, bool] | None:
        """A Ready snapshot of ``vm`` old enough that its restore shows in the uptime,
        and whether it holds memory."""
        items = json.loads(self.kubectl("get", "vmsnapshot", "-o", "json"))["items"]
        now = time.time()
        ready = [
            item
            for item in items
            if item["spec"].get("vmName") == vm.name
            and (item.get("status") or {}).get("phase") == "Ready"
            and now - datetime.fromisoformat(item["metadata"]["creationTimestamp"]).timestamp()
            >= RESTORE_MIN_AGE_S
        ]
        # Memory snapshots first: their revert is what the guest's uptime shows.
        ready.sort(key=lambda item: not item["status"].get("memoryIncluded"))
        if not ready:
            return None
        return str(ready[0]["metadata"]["name"]), bool(ready[0]["status"].get("memoryIncluded"))

    def apply_object(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        manifest = {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def kubectl(self, *args: str, input: str | None = None) -> str:
        """Run kubectl in the namespace, retrying while the apiserver is down."""
        deadline = time.monotonic() + 60
        while True:
            result = self.cluster.kubectl("-n", self.namespace, *args, input=input, check=False)
            if result.returncode == 0:
                return result.stdout
            if time.monotonic() > deadline:
                raise KubectlGaveUpError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
            time.sleep(1.0)


class KubectlGaveUpError(RuntimeError):
    """kubectl failed for a minute: the operation's outcome is unknown."""
