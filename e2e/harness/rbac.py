"""The operators' identities in the e2e suite: the Helm chart's ServiceAccounts.

The suite runs the agents and the controller with tokens of the chart's ServiceAccounts,
not the admin's certificate, so every end-to-end test also proves that the chart's
least-privilege RBAC is enough for what it exercises (and a missing rule fails a test).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from harness import cluster as local_system
from harness import controlplane
from harness import helm as hh

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "virtfleet"
RBAC_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
AGENT_KUBECONFIG = "VIRTFLEET_AGENT_KUBECONFIG"
CONTROLLER_KUBECONFIG = "VIRTFLEET_CONTROLLER_KUBECONFIG"


def render(*extra: str) -> list[dict[str, Any]]:
    out = hh.helm("template", "virtfleet", str(CHART), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def chart_identities(state_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Apply the chart's RBAC and return env entries naming a kubeconfig per process."""
    docs = [d for d in render() if d["kind"] in RBAC_KINDS]
    local_system.kubectl(
        env,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )
    accounts = {
        d["metadata"]["name"]: d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "ServiceAccount"
    }
    admin = Path(env["KUBECONFIG"])
    folder = state_dir / "rbac"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for var, account in (
        (AGENT_KUBECONFIG, "virtfleet-agent"),
        (CONTROLLER_KUBECONFIG, "virtfleet-controller"),
    ):
        token = controlplane.mint_token(admin, accounts[account], account, duration="24h")
        path = controlplane.kubeconfig_for_token(
            folder / f"{account}.kubeconfig",
            env["KUBE_APISERVER"],
            controlplane.ca_file(state_dir),
            token,
        )
        out[var] = str(path)
    return out
