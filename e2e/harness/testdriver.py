"""A fake node backed by libvirt's test driver: the control plane at scale, without QEMU.

Why: churn, soak and control-plane benchmarks need hundreds of VMs whose "hypervisor"
costs nothing, so that what is measured is virtfleet (agent, controller, apiserver), not
QEMU start-up on a 2-core machine. The node is a real agent process (the same argv as
the harness's other agents, ``operators.start_agent``) whose libvirt URI is
``test:///<state>/testdriver/<node>.xml``: libvirt's in-process mock hypervisor, loaded
from a node file that this module writes with

* node info (``<cpu>``, ``<memory>`` in KiB) sized for the VMs a test asks room for —
  just enough, so that unpinned VMs of other tests keep going to the real nodes, which
  report more placeable memory (the controller spreads to the emptiest node);
* the storage pools the agent is configured with (``virtfleet-images``,
  ``virtfleet-local``, ``virtfleet-shared``), predefined and active;
* optionally, domains that are already running when the driver loads (the resync
  benchmark's "the node kept its domains while the agent was down").

Each agent process gets a *fresh* driver from the file (file-backed test connections are
not shared, unlike ``test:///default``), so the file is the node's whole persistent state.
The Kubernetes ``Node`` object is registered like the real nodes' (``cluster.register_nodes``)
and removed again by :func:`stop`, together with the node's ``VMHost``.

Bench VMs are the smallest valid VM: 16 MiB, no disk, no kernel, pinned with
``spec.nodeName`` so they never land on node-a/node-b.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from harness import cluster as local_system
from harness import fleet, nodes, operators, rbac, testing

NODE_NAME = "td-0"
VM_MEMORY_MIB = 16
#: Room above the VMs' memory: the controller must never see the node as full.
HEADROOM_MIB = 256
CPUS = 64
#: Pools the harness's agents are configured with (``operators.agent_argv``).
POOLS = (nodes.IMAGES_POOL, nodes.LOCAL_POOL, nodes.SHARED_POOL, nodes.SMALL_POOL)
READY_TIMEOUT_S = 60.0
#: Deleting a VM on the test driver takes milliseconds; this bounds a whole fleet's.
DELETE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TestDriverNode:
    """One fake node: its name, node file and the harness state it belongs to."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    file: Path
    state_dir: Path
    capacity_vms: int

    @property
    def uri(self) -> str:
        return f"test://{self.file}"

    @property
    def process_name(self) -> str:
        """The agent's name in ``<state>/operators`` (pid file, log)."""
        return f"agent-{self.name}"

    @property
    def log(self) -> Path:
        return operators.log_path(self.state_dir, self.process_name)

    def as_harness_node(self) -> nodes.Node:
        """The shape ``operators.start_agent`` and ``cluster.register_nodes`` take."""
        root = self.file.parent / self.name
        return nodes.Node(name=self.name, uri=self.uri, port=0, root=root, shared_dir=root)

    def pid(self) -> int | None:
        return operators.pid_of(self.state_dir, self.process_name)


def node_file_xml(memory_mib: int, cpus: int = CPUS, domains: Iterable[str] = ()) -> str:
    """The test driver's node file: node info, the agent's pools, optional running domains.

    Format: libvirt's ``src/test/test_driver.c`` (``testOpenFromFile``) and
    ``examples/xml/test/testnode.xml``; memory is in KiB; inline ``<pool>``/``<domain>``
    elements are parsed like ``virsh pool-define``/``define`` input, and every domain of
    the file starts out running.
    """
    pools = "".join(
        f"<pool type='dir'><name>{escape(name)}</name>"
        f"<target><path>{escape(nodes.POOL_PATHS[name])}</path></target></pool>"
        for name in POOLS
    )
    return (
        "<node>"
        f"<cpu><mhz>3000</mhz><model>x86_64</model><active>{cpus}</active><nodes>1</nodes>"
        f"<sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>"
        f"<memory>{memory_mib * 1024}</memory>"
        f"{pools}{''.join(domains)}"
        "</node>\n"
    )


def memory_for(capacity_vms: int) -> int:
    return capacity_vms * VM_MEMORY_MIB + HEADROOM_MIB


def node(state_dir: Path, capacity_vms: int, name: str = NODE_NAME) -> TestDriverNode:
    folder = state_dir / "testdriver"
    folder.mkdir(parents=True, exist_ok=True)
    return TestDriverNode(name, (folder / f"{name}.xml").resolve(), state_dir, capacity_vms)


def write_node_file(td: TestDriverNode, domains: Iterable[str] = ()) -> None:
    td.file.write_text(node_file_xml(memory_for(td.capacity_vms), domains=domains))


def start(
    state_dir: Path,
    env: Mapping[str, str],
    *,
    capacity_vms: int,
    name: str = NODE_NAME,
    domains: Iterable[str] = (),
    agent_args: Sequence[str] = (),
) -> TestDriverNode:
    """Node file, Node object and a running agent whose VMHost is Ready (idempotent);
    ``agent_args`` are added to the agent's command line (a metrics endpoint...)."""
    td = node(state_dir, capacity_vms, name)
    if td.pid() is None:
        write_node_file(td, domains)
    local_system.register_nodes(env, [td.as_harness_node()])
    operators.start_controller(state_dir, env)  # no-op when it runs already
    start_agent(td, env, agent_args)
    return td


def start_agent(td: TestDriverNode, env: Mapping[str, str], agent_args: Sequence[str] = ()) -> int:
    """Start the node's agent (same argv as the real nodes' agents) and wait for its VMHost."""
    since = time.time()
    pid = operators.start_agent(
        td.state_dir,
        env,
        td.as_harness_node(),
        name=td.process_name,
        kubeconfig=agent_identity(td, env),
        extra=agent_args,
    )
    wait_host_ready(env, td.name, since)
    return pid


def agent_identity(td: TestDriverNode, env: Mapping[str, str]) -> Path | None:
    """When the suite runs the chart's identities (``rbac.chart_identities``), the fake
    node's agent gets what the real nodes' agents get: the chart's agent ServiceAccount
    with a token bound to its Node (so the node-restriction policy applies); else admin."""
    if rbac.CONTROLLER_KUBECONFIG not in env:
        return None
    return rbac.agent_kubeconfig(td.state_dir, env, td.name)


def kill_agent(td: TestDriverNode, sig: int = signal.SIGKILL) -> None:
    operators.kill(td.state_dir, td.process_name, sig)


def wait_host_ready(
    env: Mapping[str, str], name: str, since: float, timeout: float = READY_TIMEOUT_S
) -> None:
    """Until the node's VMHost says Ready with a heartbeat written after ``since``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = local_system.kubectl(env, "get", "vmhost", name, "-o", "json", check=False)
        if out.returncode == 0:
            status = json.loads(out.stdout).get("status") or {}
            beat = status.get("heartbeatTime")
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            if ready and beat and _epoch(beat) >= int(since):
                return
        time.sleep(0.3)
    raise TimeoutError(f"VMHost {name} not Ready within {timeout:.0f}s")


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def stop(td: TestDriverNode, env: Mapping[str, str]) -> None:
    """Stop the agent and remove the node's Node, VMHost and Lease (idempotent)."""
    kill_agent(td, signal.SIGTERM)
    for kind in ("vmhost", "node"):
        local_system.kubectl(env, "delete", kind, td.name, "--ignore-not-found", check=False)
    local_system.kubectl(
        env, "delete", "lease", "-n", "kube-node-lease", f"virtfleet-agent-{td.name}",
        "--ignore-not-found", check=False,
    )  # fmt: skip


def vm_manifest(
    name: str, namespace: str, node_name: str = NODE_NAME, **spec: Any
) -> dict[str, Any]:
    """The smallest valid VM (16 MiB, no disk, no kernel), pinned to the fake node."""
    body: dict[str, Any] = {
        "memory": {"size": f"{VM_MEMORY_MIB}Mi"},
        "nodeName": node_name,
        "terminationGracePeriodSeconds": 0,
        **spec,
    }
    return testing.vm_object(name, namespace, body)


# --- the agent process, from the outside ---------------------------------------------------


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mib(pid: int) -> float:
    """Resident set size now (``VmRSS``)."""
    return int(_status_fields(pid)["VmRSS"].split()[0]) / 1024


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of the process's life (``VmHWM``)."""
    return int(_status_fields(pid)["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_records(td: TestDriverNode, offset: int = 0) -> list[dict[str, Any]]:
    """The agent's JSON log records from byte ``offset`` on (lines that are not JSON skipped)."""
    records = []
    with td.log.open("rb") as f:
        f.seek(offset)
        for line in f:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
    return records


def log_size(td: TestDriverNode) -> int:
    return td.log.stat().st_size if td.log.exists() else 0


# --- what the agent defines, without the agent -----------------------------------------------


def domain_xml(vm: Mapping[str, Any], serial_dir: str = nodes.SERIAL_DIR_IN_NODE) -> str:
    """The domain XML the agent defines for ``vm`` (a bench VM: no disk, kernel or seed).

    Built with the agent's own renderer and inputs (``NodeDriver._resolve`` reduced to a
    VM without storage), so the raw-libvirt baseline defines exactly the same domains, and
    a node file of these domains is what the node held before an agent restart.
    """
    from virtfleet.api.virtualmachine import VirtualMachineSpec
    from virtfleet.domain import DomainInputs, NodeResources, domain_name, render_xml

    meta = vm["metadata"]
    spec = VirtualMachineSpec.model_validate(vm["spec"])
    if spec.disks or spec.kernel or spec.cloud_init:
        raise ValueError("only bench VMs without storage can be rendered here")
    namespace, name = str(meta["namespace"]), str(meta["name"])
    resources = NodeResources(
        disks={}, serial_log=f"{serial_dir}/{domain_name(namespace, name)}.log"
    )
    inputs = DomainInputs(
        namespace=namespace,
        name=name,
        uid=str(meta["uid"]),
        generation=int(meta.get("generation", 1)),
        spec=spec,
        resources=resources,
    )
    return render_xml(inputs)


# --- a bench run: node + namespace, cleaned up whatever happens --------------------------------


@dataclass
class BenchFleet:
    """What a benchmark or churn test holds: the fake node, an API client, its namespace."""

    td: TestDriverNode
    api: Any  # kubernetes.client.ApiClient
    namespace: str
    env: Mapping[str, str]

    def manifests(self, names: Iterable[str]) -> list[dict[str, Any]]:
        return [vm_manifest(name, self.namespace, self.td.name) for name in names]


@contextlib.contextmanager
def bench_fleet(
    state_dir: Path,
    env: Mapping[str, str],
    *,
    capacity_vms: int,
    prefix: str,
    agent_args: Sequence[str] = (),
) -> Iterator[BenchFleet]:
    """A running fake node and a fresh namespace; afterwards every VM is deleted (through
    the agent, so no finalizer is left), the namespace removed and the node stopped."""
    td = start(state_dir, env, capacity_vms=capacity_vms, agent_args=agent_args)
    api = fleet.api_client(env)
    delete_leftovers(api, td.name)
    namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
    fleet.create_namespace(api, namespace)
    try:
        yield BenchFleet(td, api, namespace, env)
    finally:
        try:
            delete_all(api, namespace)
        finally:
            fleet.delete_namespace(api, namespace)
            stop(td, env)
            api.close()  # type: ignore[no-untyped-call]


def delete_all(api: Any, namespace: str, timeout: float = DELETE_TIMEOUT_S) -> None:
    """Delete every VM of ``namespace`` and wait until they are gone (finalizers released)."""
    names = [vm["metadata"]["name"] for vm in fleet.list_vms(api, namespace)]
    fleet.run_parallel(lambda name: fleet.delete(api, namespace, name), names)
    deadline = time.monotonic() + timeout
    while fleet.list_vms(api, namespace):
        if time.monotonic() > deadline:
            left = [vm["metadata"]["name"] for vm in fleet.list_vms(api, namespace)]
            raise TimeoutError(f"{len(left)} VMs not deleted within {timeout:.0f}s: {left[:5]}")
        time.sleep(0.5)


def delete_leftovers(api: Any, node_name: str, timeout: float = DELETE_TIMEOUT_S) -> None:
    """Delete VMs an earlier, interrupted run left on the fake node: they would hold its
    memory in the controller's placement and block a fresh run's VMs."""

    def on_node(vm: Mapping[str, Any]) -> bool:
        labels = vm["metadata"].get("labels") or {}
        return bool(
            labels.get(fleet.NODE_LABEL) == node_name
            or (vm.get("spec") or {}).get("nodeName") == node_name
        )

    leftovers = [vm for vm in fleet.list_all_vms(api) if on_node(vm)]
    for vm in leftovers:
        fleet.delete(api, vm["metadata"]["namespace"], vm["metadata"]["name"])
    deadline = time.monotonic() + timeout
    while any(on_node(vm) for vm in fleet.list_all_vms(api)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"leftover VMs on {node_name} not deleted within {timeout:.0f}s")
        time.sleep(0.5)


@dataclass
class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread: (monotonic, MiB)."""

    pid: int
    interval: float = 0.5
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append((time.monotonic(), rss_mib(self.pid)))
            self._stop.wait(self.interval)


def raw_define_start(
    xmls: Iterable[str], spacing: float = 0.0, capacity_vms: int = 1000
) -> list[float]:
    """Raw libvirt-python doing the agent's libvirt work: define + start each domain on a
    fresh file-backed test driver (same node file shape), ``spacing`` seconds apart.

    Returns each domain's define+start duration in seconds (its "creation → Running").
    """
    import tempfile

    import libvirt

    from virtfleet.hypervisor.schema import check_domain_xml

    with tempfile.TemporaryDirectory(prefix="vf-raw-") as folder:
        path = Path(folder) / "node.xml"
        path.write_text(node_file_xml(memory_for(capacity_vms)))
        conn = libvirt.open(f"test://{path}")
        try:
            durations = []
            began = time.monotonic()
            for index, xml in enumerate(xmls):
                delay = began + index * spacing - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                started = time.monotonic()
                check_domain_xml(xml)  # the agent's own schema check (hypervisor/schema.py)
                conn.defineXMLFlags(xml, 0).create()
                durations.append(time.monotonic() - started)
            return durations
        finally:
            conn.close()


def bench_vm_xmls(count: int, prefix: str = "raw") -> list[str]:
    """``count`` bench domains as the agent would define them (fresh uids)."""
    xmls = []
    for index in range(count):
        vm = vm_manifest(f"{prefix}-{index}", "raw-bench")
        vm["metadata"]["uid"] = str(uuid.uuid4())
        xmls.append(domain_xml(vm))
    return xmls
