"""The virtfleet processes of the local system: one agent per node and the controller.

They run as plain subprocesses of this machine (what a DaemonSet and a Deployment would
run), with the admin kubeconfig, logs and pid files under ``<state_dir>/operators``. An
agent runs in its node's network namespace (:mod:`harness.underlay`), as a hostNetwork
pod would: it dials the apiserver and the object store on the node's loopback (the
forwarder) and the other nodes' libvirtds on their underlay addresses.
Tests kill and restart them (``kill``/``start_agent``) to prove crash safety. A test may
run them with another identity (``kubeconfig=``, e.g. a ServiceAccount token of the Helm
chart's RBAC), under another process ``name`` and with ``extra`` arguments.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness import nodes, prometheus, underlay

STOP_TIMEOUT_S = 30.0


def _dir(state_dir: Path) -> Path:
    path = state_dir / "operators"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_path(state_dir: Path, name: str) -> Path:
    return _dir(state_dir) / f"{name}.log"


def _pidfile(state_dir: Path, name: str) -> Path:
    return _dir(state_dir) / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def pid_of(state_dir: Path, name: str) -> int | None:
    path = _pidfile(state_dir, name)
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    return pid if pid and _alive(pid) else None


def agent_argv(node: nodes.Node) -> list[str]:
    return [
        sys.executable, "-m", "virtfleet.cli", "agent",
        "--node", node.name,
        "--libvirt-uri", node.uri,
        "--pool", nodes.LOCAL_POOL,
        "--pool", nodes.SHARED_POOL,
        "--pool", nodes.SMALL_POOL,
        "--shared-pool", nodes.SHARED_POOL,
        "--serial-log-dir", node.serial_dir_in_node,
        "--resync-seconds", "15",
        "--heartbeat-seconds", "5",
        *_watchdog(node),
        "--log-format", "json",
        *_http_sources(node),
        *_guest_firewall(node),
        *_vm_networks(node),
        *_console(node),
        *_metrics(node),
    ]  # fmt: skip


def _metrics(node: nodes.Node) -> list[str]:
    """/metrics on the node's address, where the harness's Prometheus scrapes it; the
    usage read every 2 s (a test sees a counter move within seconds)."""
    if node.address is None or node.netns is None:
        return []
    listen = f"{node.address}:{prometheus.AGENT_METRICS_PORT}"
    return ["--metrics-listen", listen, "--metrics-interval-seconds", "2"]


#: Where each node's agent serves `virtfleet console` (on the node's underlay address).
CONSOLE_PORT = 18450


def _console(node: nodes.Node) -> list[str]:
    """Consoles on the node's own address (its network namespace), reached from the
    machine over the underlay like a real node's port."""
    if node.address is None or node.netns is None:
        return []
    return ["--console-listen", f"{node.address}:{CONSOLE_PORT}"]


def _vm_networks(node: nodes.Node) -> list[str]:
    """VMNetworks: the node's underlay address is its VXLAN endpoint; the DHCP servers'
    files are per node (the harness's agents share the machine's /run)."""
    if node.address is None or node.netns is None:
        return []
    state = underlay.network_state_dir(node.netns)
    return ["--tunnel-address", node.address, "--network-state-dir", str(state)]


def _http_sources(node: nodes.Node) -> list[str]:
    """The http-source tests serve images on the machine's underlay address (private
    addresses, which agents deny by default; a test-driver node's agent downloads over
    the machine's loopback)."""
    if node.address is None:
        return ["--http-allow-cidr", "127.0.0.0/8"]
    return ["--http-allow-cidr", underlay.subnet(node.root.parent.parent)]


def _in_netns(node: nodes.Node) -> list[str]:
    return [] if node.netns is None else ["nsenter", f"--net=/run/netns/{node.netns}", "--"]


def _watchdog(node: nodes.Node) -> list[str]:
    """The node's simulated watchdog (nodes.WATCHDOG_IN_NODE): armed only while the agent
    holds HA VMs. Nodes without QEMU (test driver) have none."""
    if node.qemu_gid is None:
        return []
    path = node.root / "run" / nodes.WATCHDOG_IN_NODE.removeprefix("/run/")
    return ["--watchdog", str(path), "--watchdog-timeout", f"{nodes.WATCHDOG_TIMEOUT:g}"]


def _guest_firewall(node: nodes.Node) -> list[str]:
    """The guest firewall knows this node's QEMUs by their group (nodes.py). A node
    without QEMU (test driver) fences nothing: its agent must not key a table on any
    group."""
    if node.qemu_gid is None:
        return ["--user-nic-host-access"]
    return ["--qemu-gid", str(node.qemu_gid)]


def controller_argv() -> list[str]:
    # Failover tests fail the nodes one after the other: a shorter damping than the
    # default 30 s (doubled per failure, up to 10 min) keeps them, and the tests after
    # them, from waiting on a damped node (the rule itself is unit-tested).
    return [
        sys.executable, "-m", "virtfleet.cli", "controller", "--standalone",
        "--failure-damping", "5", "--failure-damping-max", "10",
        "--metrics-listen", f"127.0.0.1:{prometheus.controller_metrics_port()}",
    ]  # fmt: skip


def _spawn(state_dir: Path, name: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
    existing = pid_of(state_dir, name)
    if existing is not None:
        return existing
    log = log_path(state_dir, name).open("ab")
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        start_new_session=True,
    )
    _pidfile(state_dir, name).write_text(str(process.pid))
    return process.pid


def _with_kubeconfig(
    env: Mapping[str, str], kubeconfig: Path | None, default_var: str
) -> Mapping[str, str]:
    """The identity to run with: given, else the suite's (``env[default_var]``), else admin."""
    chosen = str(kubeconfig) if kubeconfig is not None else env.get(default_var)
    return env if not chosen else {**env, "KUBECONFIG": chosen}


def agent_kubeconfig_var(node: str) -> str:
    """The env entry naming the kubeconfig of ``node``'s agent (a token bound to its Node)."""
    return "VIRTFLEET_AGENT_KUBECONFIG_" + node.upper().replace("-", "_")


def start_agent(
    state_dir: Path,
    env: Mapping[str, str],
    node: nodes.Node,
    *,
    kubeconfig: Path | None = None,
    name: str | None = None,
    extra: Sequence[str] = (),
) -> int:
    """Start the agent of ``node`` (admin kubeconfig unless ``kubeconfig`` is given)."""
    argv = [*_in_netns(node), *agent_argv(node), *extra]
    return _spawn(
        state_dir,
        name or f"agent-{node.name}",
        argv,
        _with_kubeconfig(env, kubeconfig, agent_kubeconfig_var(node.name)),
    )


def start_controller(
    state_dir: Path,
    env: Mapping[str, str],
    *,
    kubeconfig: Path | None = None,
    name: str = "controller",
    extra: Sequence[str] = (),
) -> int:
    """Start the controller (admin kubeconfig unless ``kubeconfig`` is given)."""
    argv = [*controller_argv(), *extra]
    return _spawn(
        state_dir, name, argv, _with_kubeconfig(env, kubeconfig, "VIRTFLEET_CONTROLLER_KUBECONFIG")
    )


def start(state_dir: Path, env: Mapping[str, str]) -> dict[str, int]:
    """Start (or keep) the controller and an agent per node; returns name → pid.

    A running agent whose command line does not start with today's :func:`agent_argv`
    (started by an older harness, e.g. without a flag a test relies on) is restarted.
    """
    pids = {"controller": start_controller(state_dir, env)}
    for node in nodes.nodes_from_env(dict(env)):
        name = f"agent-{node.name}"
        pid = pid_of(state_dir, name)
        wanted = agent_argv(node)[1:]  # not the interpreter's path (python or python3)
        if pid is not None and _cmdline(pid)[1 : len(wanted) + 1] != wanted:
            kill(state_dir, name, signal.SIGTERM)
        pids[name] = start_agent(state_dir, env, node)
    return pids


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []  # gone meanwhile: start_agent starts a new one
    return raw.decode(errors="replace").split("\0")[:-1]


def kill(state_dir: Path, name: str, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to one process (SIGKILL: a crash) and wait until it is gone."""
    pid = pid_of(state_dir, name)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)
    _pidfile(state_dir, name).unlink(missing_ok=True)


def stop(state_dir: Path) -> None:
    """Stop every virtfleet process of ``state_dir`` (SIGTERM, then SIGKILL); idempotent."""
    folder = state_dir / "operators"
    if not folder.exists():
        return
    for pidfile in folder.glob("*.pid"):
        kill(state_dir, pidfile.stem, signal.SIGTERM)
