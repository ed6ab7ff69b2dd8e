"""Node failures for the failover tests: power a node off (every process of it SIGKILLed
at once, its agent too), power it on again, partition it (its agent killed while its
QEMUs run), freeze its watchdog."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from harness import nodes as hn
from harness import operators
from harness.testing import Cluster, wait_for


def _agent(node: hn.Node) -> str:
    return f"agent-{node.name}"


#: The kubeconfig each powered-off node's agent ran with, for power_on to reuse (the
#: suite's agents run with their own Node-bound tokens, a benchmark's with admin's).
_KUBECONFIGS: dict[str, Path] = {}


def _kubeconfig_of(pid: int) -> Path | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"KUBECONFIG="):
            return Path(entry.removeprefix(b"KUBECONFIG=").decode())
    return None


def power_off(system: Cluster, node: hn.Node) -> float:
    """SIGKILL the node's libvirtd, virtlogd, QEMUs, supervisor and agent together (a
    power cut: nothing gets to tidy up); returns the monotonic time of the cut."""
    agent = operators.pid_of(system.state_dir, _agent(node))
    kubeconfig = _kubeconfig_of(agent) if agent else None
    if kubeconfig is not None:
        _KUBECONFIGS[node.name] = kubeconfig
    victims = hn.node_pids(node) | ({agent} if agent else set())
    cut = time.monotonic()
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    operators.kill(system.state_dir, _agent(node))  # reaps and forgets its pid file
    wait_for(lambda: not hn.node_pids(node), 30, 0.1, f"{node.name}'s processes to die")
    return cut


def power_on(system: Cluster, node: hn.Node) -> None:
    """Start the node again (libvirtd finds its persistent domains shut off) and its agent."""
    state = Path(system.env["VIRTFLEET_NODES_STATE_DIR"])
    hn.up(state, [n.name for n in system.nodes])
    operators.start_agent(
        system.state_dir, system.env, node, kubeconfig=_KUBECONFIGS.pop(node.name, None)
    )


def supervisor_pid(node: hn.Node) -> int:
    return int((node.root / "run" / "supervisor.pid").read_text().strip())


def freeze_watchdog(node: hn.Node) -> None:
    """SIGSTOP the node's supervisor: its simulated watchdog stops looking (a broken
    watchdog); libvirtd and the QEMUs run on."""
    os.kill(supervisor_pid(node), signal.SIGSTOP)


def thaw_watchdog(node: hn.Node) -> None:
    os.kill(supervisor_pid(node), signal.SIGCONT)


def events(system: Cluster, namespace: str | None, name: str, reason: str) -> list[dict[str, Any]]:
    args = ["get", "events", "-o", "json", "--field-selector", f"involvedObject.name={name}"]
    args += ["-n", namespace] if namespace else ["-A"]
    items = json.loads(system.kubectl(*args).stdout)["items"]
    return [e for e in items if e.get("reason") == reason]


def host_health(system: Cluster, node: str) -> dict[str, Any]:
    return dict((system.get("vmhost", node).get("status") or {}).get("health") or {})


def restore_nodes(system: Cluster) -> None:
    """Every node back (powered on, its agent running) and out of its damping: what the
    tests after a failover test expect."""
    for node in system.nodes:
        if not hn.node_pids(node):
            power_on(system, node)
        elif operators.pid_of(system.state_dir, _agent(node)) is None:
            operators.start_agent(system.state_dir, system.env, node)
    wait_for(
        lambda: all(host_health(system, n.name).get("state") == "Healthy" for n in system.nodes),
        120,
        1.0,
        "every node Healthy",
    )
