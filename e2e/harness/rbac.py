"""The operators' identities in the e2e suite: the Helm chart's ServiceAccounts.

The suite runs the agents and the controller with tokens of the chart's ServiceAccounts,
not the admin's certificate, so every end-to-end test also proves that the chart's
least-privilege RBAC is enough for what it exercises (and a missing rule fails a test).
The chart's node-restriction policy is installed too, and each agent gets its own token
bound to its Node object (what a DaemonSet pod's token is on Kubernetes >= 1.30), so
every test also proves that the policy admits everything an agent legitimately writes.
So are the chart's tenant guards (``templates/admission.yaml``: only the two
ServiceAccounts write status or the ``virtfleet.io/node`` label): every status write and
placement of the suite passes them. The tests' own admin client is ``system:masters``,
which the guards let through (``admission.trustedGroups``), so tests may still stage status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from harness import cluster as local_system
from harness import controlplane, nodes, operators
from harness import helm as hh

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "virtfleet"
RBAC_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
AGENT_ACCOUNT = "virtfleet-agent"
CONTROLLER_KUBECONFIG = "VIRTFLEET_CONTROLLER_KUBECONFIG"


def render(*extra: str) -> list[dict[str, Any]]:
    out = hh.helm("template", "virtfleet", str(CHART), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def apply_rbac(env: Mapping[str, str]) -> dict[str, str]:
    """Apply the chart's identities, RBAC and admission policies; ``{account: ns}``."""
    docs = [d for d in render() if d["kind"] in RBAC_KINDS]
    local_system.kubectl(
        env,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )
    return {
        d["metadata"]["name"]: d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "ServiceAccount"
    }


def agent_kubeconfig(
    state_dir: Path,
    env: Mapping[str, str],
    node: str,
    *,
    folder: Path | None = None,
    namespace: str | None = None,
) -> Path:
    """A kubeconfig of the agent ServiceAccount whose token is bound to Node ``node``.

    The apiserver then adds ``authentication.kubernetes.io/node-name`` to the requests'
    user info, which is what the node-restriction policy keys on. Applies the chart's
    RBAC first unless the agent's ``namespace`` is given (it was applied already).
    """
    namespace = namespace or apply_rbac(env)[AGENT_ACCOUNT]
    token = local_system.kubectl(
        env, "-n", namespace, "create", "token", AGENT_ACCOUNT, "--duration", "24h",
        "--bound-object-kind", "Node", "--bound-object-name", node,
    ).stdout.strip()  # fmt: skip
    folder = folder or state_dir / "rbac"
    folder.mkdir(parents=True, exist_ok=True)
    return controlplane.kubeconfig_for_token(
        folder / f"{AGENT_ACCOUNT}-{node}.kubeconfig",
        env["KUBE_APISERVER"],
        controlplane.ca_file(state_dir),
        token,
    )


def chart_identities(state_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Apply the chart's RBAC and return env entries naming a kubeconfig per process.

    One per agent (``operators.agent_kubeconfig_var``: a token bound to that node) and
    one for the controller.
    """
    accounts = apply_rbac(env)
    admin = Path(env["KUBECONFIG"])
    folder = state_dir / "rbac"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for node in nodes.nodes_from_env(dict(env)):
        path = agent_kubeconfig(
            state_dir, env, node.name, folder=folder, namespace=accounts[AGENT_ACCOUNT]
        )
        out[operators.agent_kubeconfig_var(node.name)] = str(path)
    account = "virtfleet-controller"
    token = controlplane.mint_token(admin, accounts[account], account, duration="24h")
    path = controlplane.kubeconfig_for_token(
        folder / f"{account}.kubeconfig",
        env["KUBE_APISERVER"],
        controlplane.ca_file(state_dir),
        token,
    )
    out[CONTROLLER_KUBECONFIG] = str(path)
    return out
