"""A fleet of fake nodes: N agents, each on its own test-driver node, one controller.

The fleet benchmark (``bench/scenarios/fleet.py``) and its smoke test need many nodes
whose hypervisor costs nothing, so that what is measured is virtfleet at fleet scale:
the controller placing thousands of VMs, every agent's watch and memory, the apiserver's
requests. Each node is :mod:`harness.testdriver`'s (a real agent process on a
``test:///<file>`` driver, a Node object, a VMHost), labelled :data:`FLEET_LABEL` so that
the fleet's VMs select these nodes only (never the harness's real libvirt nodes) while
the controller still chooses among them.

Every agent serves ``/metrics`` on a loopback port of its own (:attr:`FakeFleet.ports`):
the benchmark reads what each agent's watches received and which requests it made.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import cluster as local_system
from harness import operators, testdriver, testing
from virtfleet.agent.settings import AgentSettings

FLEET_LABEL = "virtfleet.io/bench-fleet"
#: The agents' usage collection (the test driver has no usage: cheap either way).
METRICS_INTERVAL_S = 15


#: The agent's own defaults for its periodic work (``AgentSettings``), which the harness
#: shortens for its tests (resync 15 s, heartbeat 5 s): a fleet measured for production
#: runs at production rates (20 nodes' heartbeats reach every agent's VMHost watch).
_DEFAULTS = AgentSettings(node_name="fleet")
PRODUCTION_RATES = (
    "--resync-seconds",
    str(_DEFAULTS.resync_seconds),
    "--heartbeat-seconds",
    str(_DEFAULTS.heartbeat_seconds),
)


@dataclass
class FakeFleet:
    nodes: list[testdriver.TestDriverNode]
    #: node name → the loopback port of its agent's /metrics.
    ports: dict[str, int]
    #: The agents run at production rates (:data:`PRODUCTION_RATES`), not the harness's.
    production_rates: bool = False

    def pid(self, node: str) -> int | None:
        return next(td.pid() for td in self.nodes if td.name == node)

    def scrape(self, node: str) -> str:
        url = f"http://127.0.0.1:{self.ports[node]}/metrics"
        with urllib.request.urlopen(url, timeout=30) as answer:
            return bytes(answer.read()).decode()

    def agent_args(self, node: str) -> list[str]:
        return [
            "--metrics-listen",
            f"127.0.0.1:{self.ports[node]}",
            "--metrics-interval-seconds",
            str(METRICS_INTERVAL_S),
            *(PRODUCTION_RATES if self.production_rates else ()),
        ]


def node_names(count: int, prefix: str = "fleet") -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(count)]


def start(
    state_dir: Path,
    env: Mapping[str, str],
    *,
    count: int,
    capacity_vms: int,
    prefix: str = "fleet",
    production_rates: bool = False,
) -> FakeFleet:
    """``count`` fake nodes with room for ``capacity_vms`` VMs each, their agents all
    started at once; returns when every VMHost is Ready."""
    tds = [testdriver.node(state_dir, capacity_vms, name) for name in node_names(count, prefix)]
    fleet = FakeFleet(tds, {td.name: free_port() for td in tds}, production_rates)
    for td in tds:
        if td.pid() is None:
            testdriver.write_node_file(td)
    local_system.register_nodes(env, [td.as_harness_node() for td in tds])
    local_system.kubectl(
        env, "label", "node", "--overwrite", *(td.name for td in tds), f"{FLEET_LABEL}=true"
    )
    operators.start_controller(state_dir, env)
    since = time.time()
    for td in tds:
        operators.start_agent(
            state_dir,
            env,
            td.as_harness_node(),
            name=td.process_name,
            kubeconfig=testdriver.agent_identity(td, env),
            extra=fleet.agent_args(td.name),
        )
    for td in tds:
        testdriver.wait_host_ready(env, td.name, since, timeout=120)
    return fleet


def restart_agent(fleet: FakeFleet, td: testdriver.TestDriverNode, env: Mapping[str, str]) -> int:
    """Start ``td``'s agent again (after a kill) with the fleet's arguments."""
    return testdriver.start_agent(td, env, fleet.agent_args(td.name))


def stop(fleet: FakeFleet, env: Mapping[str, str]) -> None:
    for td in fleet.nodes:
        testdriver.stop(td, env)


def vm_manifest(name: str, namespace: str) -> dict[str, Any]:
    """The smallest valid VM (16 MiB, no disk), for any node of the fleet: the controller
    places it."""
    body: dict[str, Any] = {
        "memory": {"size": f"{testdriver.VM_MEMORY_MIB}Mi"},
        "nodeSelector": {FLEET_LABEL: "true"},
        "terminationGracePeriodSeconds": 0,
    }
    return testing.vm_object(name, namespace, body)


def manifests(names: Iterable[str], namespace: str) -> list[dict[str, Any]]:
    return [vm_manifest(name, namespace) for name in names]


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
