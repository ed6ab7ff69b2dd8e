"""Watch health: the agent is never left deaf, and its liveness probe says so when it is.

kopf keeps one watch stream per resource. After an apiserver crash or a long quiet spell
the stream must be re-established, or the agent would silently stop reconciling: these
tests make a change *afterwards* and prove from ``virsh`` that the domain followed. The
liveness endpoint must answer 500 when libvirtd stops answering or the watch goes deaf
(the apiserver frozen with SIGSTOP: no heartbeat echo comes back), and 200 once both
recover, so a kubelet would restart a broken agent and leave a healthy one alone.

node-b's agent is replaced for this module by one with a liveness endpoint, a short
watch request timeout and a short staleness limit; the usual agent is back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness import controlplane, operators
from harness import nodes as hn
from harness.testing import Cluster, domain_name, vm_manifest, wait_for

NODE = "node-b"
AGENT = f"agent-{NODE}"
#: Every watch request ends after this many seconds and is made again.
WATCH_SERVER_TIMEOUT_S = 5
#: The liveness probe calls the agent deaf after this long without its VMHost echo.
STALE_S = 12
HEARTBEAT_S = 2


@dataclass(frozen=True)
class ProbedAgent:
    cluster: Cluster
    node: hn.Node
    liveness_url: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def probed(system: Cluster) -> Iterator[ProbedAgent]:
    node = system.node(NODE)
    url = f"http://{node.address}:{_free_port()}/healthz"  # the agent is in its node
    operators.kill(system.state_dir, AGENT, signal.SIGTERM)
    operators.start_agent(
        system.state_dir,
        system.env,
        node,
        extra=[
            "--liveness", url,
            "--heartbeat-seconds", str(HEARTBEAT_S),
            "--watch-server-timeout", str(WATCH_SERVER_TIMEOUT_S),
            "--watch-stale-seconds", str(STALE_S),
        ],
    )  # fmt: skip
    try:
        wait_for(lambda: liveness(url)[0] == 200, 90, 1.0, "the probed agent to be live")
        yield ProbedAgent(system, node, url)
    finally:
        operators.kill(system.state_dir, AGENT, signal.SIGTERM)
        operators.start_agent(system.state_dir, system.env, node)


def liveness(url: str) -> tuple[int, str]:
    """(HTTP status, body) of the liveness endpoint; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:
        return 0, str(err)


def domain_state(node: hn.Node, dom: str) -> str:
    result = subprocess.run(
        ["virsh", "-q", "-c", node.uri, "domstate", dom],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def set_strategy(cluster: Cluster, ns: str, name: str, strategy: str) -> None:
    patch = json.dumps({"spec": {"runStrategy": strategy}})
    cluster.kubectl("patch", "vm", name, "-n", ns, "--type=merge", "-p", patch)


def running_vm_on_node(probed: ProbedAgent, ns: str, name: str) -> str:
    probed.cluster.apply(vm_manifest(name, ns, nodeName=NODE))
    dom = domain_name(ns, name)
    wait_for(lambda: domain_state(probed.node, dom) == "running", 120, 0.5, f"{dom} running")
    return dom


def _apiserver_pid(cluster: Cluster) -> int:
    return controlplane.pids(cluster.state_dir)["kube-apiserver"]


def _libvirtd_pid(node: hn.Node) -> int:
    return int((node.root / "run" / "libvirtd.pid").read_text().strip())


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block, SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_change_after_apiserver_restart_is_reconciled(probed: ProbedAgent, namespace: str) -> None:
    cluster = probed.cluster
    dom = running_vm_on_node(probed, namespace, "after-restart")
    before = _apiserver_pid(cluster)
    controlplane.kill_apiserver(cluster.state_dir)
    time.sleep(3)  # long enough for every watch stream to notice the connection is gone
    controlplane.start_apiserver(cluster.state_dir)
    assert _apiserver_pid(cluster) != before

    set_strategy(cluster, namespace, "after-restart", "Halted")
    wait_for(
        lambda: domain_state(probed.node, dom) == "shut off",
        90,
        0.5,
        "the domain to stop after a change made once the apiserver was back",
    )
    print(f"\n[watch] apiserver pid {before} -> {_apiserver_pid(cluster)}; change reconciled")


def test_change_after_long_idle_is_reconciled(probed: ProbedAgent, namespace: str) -> None:
    cluster = probed.cluster
    dom = running_vm_on_node(probed, namespace, "after-idle")
    idle = 3 * WATCH_SERVER_TIMEOUT_S + 2
    time.sleep(idle)  # several watch requests end on their server timeout meanwhile
    set_strategy(cluster, namespace, "after-idle", "Halted")
    wait_for(
        lambda: domain_state(probed.node, dom) == "shut off",
        90,
        0.5,
        f"the domain to stop after {idle}s of silence",
    )
    print(f"\n[watch] idle {idle}s (> server timeout {WATCH_SERVER_TIMEOUT_S}s); reconciled")


def _wait_status(url: str, code: int, what: str, timeout: float = 90) -> str:
    def check() -> str | None:
        status, body = liveness(url)
        return body or "(empty)" if status == code else None

    body: str = wait_for(check, timeout, 1.0, what)
    return body


def _probe_report(body: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            return parsed
    return {"body": body}


def test_liveness_fails_without_libvirtd_and_when_deaf(probed: ProbedAgent) -> None:
    cluster, url = probed.cluster, probed.liveness_url
    healthy = _probe_report(_wait_status(url, 200, "a healthy agent"))
    assert str(healthy["libvirt"]).startswith("libvirt ")

    log = operators.log_path(cluster.state_dir, AGENT)
    offset = log.stat().st_size
    with frozen(_libvirtd_pid(probed.node)):
        _wait_status(url, 500, "liveness 500 while libvirtd does not answer")
    why = log.read_text(errors="replace")[offset:]
    assert "does not answer" in why or "is disconnected" in why, "not the libvirt probe"
    print("\n[liveness] libvirtd frozen -> 500 (libvirt probe)")
    _wait_status(url, 200, "liveness 200 once libvirtd answers again", timeout=120)

    offset = log.stat().st_size
    with frozen(_apiserver_pid(cluster)):
        _wait_status(url, 500, "liveness 500 while the watch hears nothing")
    assert "VMHost echo is stale" in log.read_text(errors="replace")[offset:]
    print("[liveness] apiserver frozen -> 500 (watch probe: VMHost echo is stale)")
    recovered = _probe_report(_wait_status(url, 200, "liveness 200 after recovery", 120))
    assert str(recovered["watch"]).startswith("VMHost echo")
