"""The Helm chart on the real apiserver, and virtfleet running with only its RBAC.

The chart is rendered by the pinned helm (``harness.helm``); its Namespaces, ServiceAccounts
and ClusterRoles are applied; tokens of the two ServiceAccounts are minted through the
TokenRequest API; the agents and the controller then run with those tokens instead of the
admin's ``system:masters`` certificate. Everything a VM needs must work, and anything
else must be refused. The GitOps tests apply a folder of manifests the way Argo CD and
Flux do (apply, diff, apply again, prune).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import controlplane, operators, rbac
from harness import helm as hh
from harness.testing import Cluster, domain_name, domains, vm_manifest, wait_for

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "virtfleet"
RBAC_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}


def render(*extra: str) -> list[dict[str, Any]]:
    out = hh.helm("template", "virtfleet", str(CHART), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def stream(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ChartSystem:
    """The cluster, plus kubeconfigs of the chart's ServiceAccounts and their processes."""

    def __init__(self, cluster: Cluster, docs: list[dict[str, Any]], tmp: Path) -> None:
        self.cluster = cluster
        self.docs = docs
        sas = {d["metadata"]["name"]: d["metadata"]["namespace"] for d in self.of("ServiceAccount")}
        self.agent_sa = ("virtfleet-agent", sas["virtfleet-agent"])
        self.controller_sa = ("virtfleet-controller", sas["virtfleet-controller"])
        admin = Path(cluster.env["KUBECONFIG"])
        server = cluster.env["KUBE_APISERVER"]
        ca = controlplane.ca_file(cluster.state_dir)
        self.kubeconfigs: dict[str, Path] = {}
        for name, namespace in (self.agent_sa, self.controller_sa):
            token = controlplane.mint_token(admin, namespace, name)
            self.kubeconfigs[name] = controlplane.kubeconfig_for_token(
                tmp / f"{name}.kubeconfig", server, ca, token
            )
        # The first node's agent serves it on its node's underlay address (the agents run
        # in their nodes' network namespaces).
        self.liveness_url = f"http://{cluster.nodes[0].address}:{free_port()}/healthz"

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def subject(self, sa: tuple[str, str]) -> str:
        return f"system:serviceaccount:{sa[1]}:{sa[0]}"

    def can(self, sa: tuple[str, str], verb: str, resource: str, *extra: str) -> bool:
        result = self.cluster.kubectl(
            "auth", "can-i", verb, resource, "--as", self.subject(sa), *extra, check=False
        )
        return result.stdout.strip() == "yes"

    def kubectl_as(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("--kubeconfig", str(self.kubeconfigs[name]), *args, check=False)


PROCESS_NAMES: list[str] = []


@pytest.fixture(scope="module")
def chart_system(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChartSystem]:
    docs = render()
    cluster.kubectl("apply", "-f", "-", input=stream([d for d in docs if d["kind"] in RBAC_KINDS]))
    system = ChartSystem(cluster, docs, tmp_path_factory.mktemp("chart"))

    # Processes with admin rights would hide missing rules: pause them for this module.
    state = cluster.state_dir
    admin_running = [
        name
        for name in ("controller", *(f"agent-{n.name}" for n in cluster.nodes))
        if operators.pid_of(state, name) is not None
    ]
    for name in admin_running:
        operators.kill(state, name)

    started: list[str] = []
    agents = tmp_path_factory.mktemp("agents")
    try:
        for index, node in enumerate(cluster.nodes):
            name = f"chart-agent-{node.name}"
            extra = ("--liveness", system.liveness_url) if index == 0 else ()
            operators.start_agent(
                state,
                cluster.env,
                node,
                # Each agent's own token, bound to its Node (the node-restriction policy).
                kubeconfig=rbac.agent_kubeconfig(
                    state, cluster.env, node.name, folder=agents, namespace=system.agent_sa[1]
                ),
                name=name,
                extra=extra,
            )
            started.append(name)
        operators.start_controller(
            state,
            cluster.env,
            kubeconfig=system.kubeconfigs["virtfleet-controller"],
            name="chart-controller",
        )
        started.append("chart-controller")
        fresh = {n.name: _heartbeat(cluster, n.name) for n in cluster.nodes}

        def beating() -> bool:
            return all(_heartbeat(cluster, n) not in (None, old) for n, old in fresh.items())

        wait_for(beating, 60, 0.5, "a new VMHost heartbeat from every chart-RBAC agent")
        yield system
    finally:
        for name in started:
            operators.kill(state, name, 15)
        if admin_running:
            operators.start(state, cluster.env)


def _heartbeat(cluster: Cluster, node: str) -> str | None:
    out = cluster.kubectl("get", "vmhost", node, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    value = json.loads(out.stdout).get("status", {}).get("heartbeatTime")
    return str(value) if value else None


# --- the chart's manifests on the real apiserver -----------------------------------------


def test_rendered_chart_is_accepted_by_the_apiserver(cluster: Cluster) -> None:
    docs = render("--include-crds", "--set", "argocd.healthChecks=true")
    # The Argo CD ConfigMap's namespace does not exist here; everything else must apply.
    docs = [d for d in docs if d["kind"] != "ConfigMap"]
    ns = [d for d in docs if d["kind"] == "Namespace"]
    cluster.kubectl("apply", "-f", "-", input=stream(ns))
    result = cluster.kubectl(
        "apply", "--dry-run=server", "--server-side", "--force-conflicts", "-f", "-",
        input=stream(docs),
    )  # fmt: skip
    assert "PodSecurity" not in result.stderr, result.stderr
    assert "DaemonSet" not in result.stderr


def _pod_from(docs: list[dict[str, Any]], kind: str, namespace: str) -> dict[str, Any]:
    workload = next(d for d in docs if d["kind"] == kind)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"probe-{kind.lower()}", "namespace": namespace},
        # The ServiceAccount exists only in the workload's own namespace.
        "spec": {
            k: v
            for k, v in workload["spec"]["template"]["spec"].items()
            if k != "serviceAccountName" or namespace == workload["metadata"]["namespace"]
        },
    }


def test_pod_security_levels_hold(cluster: Cluster) -> None:
    """Pods of the controller pass "restricted"; the agent's pass only "privileged"."""
    docs = render()
    accounts = [d for d in docs if d["kind"] in {"Namespace", "ServiceAccount"}]
    cluster.kubectl("apply", "-f", "-", input=stream(accounts))
    levels = {
        d["metadata"]["name"]: d["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for d in docs
        if d["kind"] == "Namespace"
    }
    restricted = next(n for n, level in levels.items() if level == "restricted")
    privileged = next(n for n, level in levels.items() if level == "privileged")

    def dry_run(pod: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
        )

    ok = dry_run(_pod_from(docs, "Deployment", restricted))
    assert ok.returncode == 0, ok.stderr
    ok = dry_run(_pod_from(docs, "DaemonSet", privileged))
    assert ok.returncode == 0, ok.stderr
    refused = dry_run(_pod_from(docs, "DaemonSet", restricted))
    assert refused.returncode != 0
    assert "violates PodSecurity" in refused.stderr


# --- least privilege ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "verb", "resource", "allowed"),
    [
        ("controller", "patch", "virtualmachines.virtfleet.io/status", True),
        ("controller", "watch", "nodes", True),
        ("controller", "create", "pods", False),
        # A VMBackupLocation's credentialsSecret, by name; never a list of them.
        ("controller", "get", "secrets", True),
        ("controller", "list", "secrets", False),
        # Retention prunes VMBackups: the one kind the controller deletes.
        ("controller", "delete", "vmbackups.virtfleet.io", True),
        ("controller", "delete", "virtualmachines.virtfleet.io", False),
        ("controller", "update", "virtualmachines.virtfleet.io", False),
        ("agent", "patch", "virtualmachines.virtfleet.io", True),
        ("agent", "create", "vmhosts.virtfleet.io", True),
        ("agent", "get", "secrets", True),
        ("agent", "list", "secrets", False),
        ("agent", "delete", "namespaces", False),
        ("agent", "delete", "virtualmachines.virtfleet.io", False),
        ("agent", "create", "virtualmachines.virtfleet.io", False),
        ("agent", "patch", "nodes", False),
    ],
)
def test_rbac_is_least_privilege(
    chart_system: ChartSystem, who: str, verb: str, resource: str, allowed: bool
) -> None:
    sa = chart_system.agent_sa if who == "agent" else chart_system.controller_sa
    assert chart_system.can(sa, verb, resource, "-A") is allowed


def test_the_tokens_themselves_are_refused_outside_their_rbac(chart_system: ChartSystem) -> None:
    result = chart_system.kubectl_as("virtfleet-controller", "get", "secrets", "-A")
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()
    result = chart_system.kubectl_as("virtfleet-agent", "delete", "namespace", "default")
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()
    result = chart_system.kubectl_as("virtfleet-agent", "get", "vm", "-A")
    assert result.returncode == 0, result.stderr


#: How the apiserver words an authorization refusal (not admission's "forbidden: unable
#: to create new content in namespace ... being terminated").
RBAC_REFUSAL = re.compile(r'forbidden: User \\?"[^"\\]+\\?" cannot', re.IGNORECASE)


def test_vm_lifecycle_with_chart_rbac(chart_system: ChartSystem, namespace: str) -> None:
    cluster = chart_system.cluster
    cluster.apply(vm_manifest("least", namespace))  # placed by the controller

    def running() -> dict[str, Any] | None:
        obj = cluster.get("vm", "least", namespace)
        return obj if (obj.get("status") or {}).get("printableStatus") == "Running" else None

    obj = wait_for(running, 120, 0.5, "the VM to run under the chart's RBAC")
    node = cluster.node(obj["status"]["nodeName"])
    assert domains(node)[domain_name(namespace, "least")] == "running"
    cluster.kubectl("wait", "--for=condition=Ready", "vm/least", "-n", namespace, "--timeout=30s")

    cluster.kubectl("delete", "vm", "least", "-n", namespace, "--timeout=90s")
    assert domain_name(namespace, "least") not in domains(node)
    log = operators.log_path(cluster.state_dir, f"chart-agent-{node.name}").read_text()
    assert not RBAC_REFUSAL.findall(log)
    controller_log = operators.log_path(cluster.state_dir, "chart-controller").read_text()
    # (Events refused in a namespace an earlier test is deleting are not RBAC refusals.)
    assert not RBAC_REFUSAL.findall(controller_log)


def test_agent_liveness_endpoint(chart_system: ChartSystem) -> None:
    def healthy() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(chart_system.liveness_url, timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body if response.status == 200 and "libvirt" in body else None
        except OSError:
            return None

    body = wait_for(healthy, 60, 1.0, "the agent's liveness endpoint")
    assert body["libvirt"].startswith("libvirt ")
    assert body["watch"].startswith("VMHost echo")


# --- GitOps: a folder of manifests applied like Argo CD / Flux do --------------------------


def _folder(tmp: Path, namespace: str, names: list[str], label: str) -> Path:
    folder = tmp / "vms"
    folder.mkdir(exist_ok=True)
    for name in names:
        manifest = vm_manifest(name, namespace, runStrategy="Halted")
        manifest["metadata"]["labels"] = {"app.kubernetes.io/part-of": label}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def test_apply_twice_changes_nothing_and_prune_removes_the_domain(
    chart_system: ChartSystem, namespace: str, tmp_path: Path
) -> None:
    cluster = chart_system.cluster
    label = f"gitops-{namespace}"[:63]
    folder = _folder(tmp_path, namespace, ["keep", "drop"], label)
    cluster.kubectl("apply", "-f", str(folder))

    def settled() -> list[dict[str, Any]] | None:
        objs = [cluster.get("vm", n, namespace) for n in ("keep", "drop")]
        ok = all(
            (o.get("status") or {}).get("printableStatus") == "Stopped"
            and (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
            for o in objs
        )
        return objs if ok else None

    before = wait_for(settled, 120, 0.5, "both halted VMs to settle")
    node = cluster.node(before[1]["status"]["nodeName"])
    assert domains(node)[domain_name(namespace, "drop")] == "shut off"

    diff = cluster.kubectl("diff", "-f", str(folder), check=False)
    assert diff.returncode == 0, f"kubectl diff is not empty:\n{diff.stdout}{diff.stderr}"
    again = cluster.kubectl("apply", "-f", str(folder)).stdout
    assert again.count("unchanged") == 2, again
    after = [cluster.get("vm", n, namespace) for n in ("keep", "drop")]
    assert [o["metadata"]["generation"] for o in after] == [
        o["metadata"]["generation"] for o in before
    ]

    (folder / "drop.yaml").unlink()
    pruned = cluster.kubectl(
        "apply", "-f", str(folder), "--prune", "-l", f"app.kubernetes.io/part-of={label}",
        "--prune-allowlist=virtfleet.io/v1alpha1/VirtualMachine",
    ).stdout  # fmt: skip
    assert "pruned" in pruned, pruned

    def gone() -> bool:
        listed = cluster.kubectl("get", "vm", "drop", "-n", namespace, check=False)
        return listed.returncode != 0 and domain_name(namespace, "drop") not in domains(node)

    wait_for(gone, 90, 0.5, "the pruned VM and its domain to be gone")
    assert domain_name(namespace, "keep") in domains(cluster.node(after[0]["status"]["nodeName"]))
