"""The agents' node restriction (the chart's ValidatingAdmissionPolicy) on the real apiserver.

RBAC lets the agent ServiceAccount patch every VM; the policy admits a write only for the
node the request's token is bound to. Each agent of the ``system`` fixture runs with its own
Node-bound token; here node-a's token tries to touch node-b's objects (refused with the
policy's message) and its own (admitted), and an unbound token is refused outright. The
rest of the suite, run with the policy installed, proves every legitimate write passes.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import controlplane, operators, rbac
from harness.testing import Cluster, vm_manifest, wait_for

NODE_A, NODE_B = "node-a", "node-b"


def as_agent(
    system: Cluster, node: str, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl with the agent token bound to ``node`` (the one that agent runs with)."""
    kubeconfig = system.env[operators.agent_kubeconfig_var(node)]
    return system.kubectl("--kubeconfig", kubeconfig, *args, input=input, check=False)


def patch_status_as(
    system: Cluster, node: str, path: str, status: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """A merge patch of a status subresource, as the agent sends it (no GET first: kubectl's
    ``patch --subresource=status`` reads before it writes, which RBAC does not grant)."""
    kubeconfig = yaml.safe_load(Path(system.env[operators.agent_kubeconfig_var(node)]).read_text())
    token = kubeconfig["users"][0]["user"]["token"]
    request = urllib.request.Request(
        f"{system.env['KUBE_APISERVER']}{path}/status",
        data=merge({"status": status}).encode(),
        method="PATCH",
        headers={"Authorization": f"Bearer {token}",
                 "Content-Type": "application/merge-patch+json"},
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(controlplane.ca_file(system.state_dir)))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return subprocess.CompletedProcess(path, 0, response.read().decode(), "")
    except urllib.error.HTTPError as exc:
        return subprocess.CompletedProcess(path, exc.code, "", exc.read().decode())


def vm_path(namespace: str, name: str) -> str:
    return f"/apis/virtfleet.io/v1alpha1/namespaces/{namespace}/virtualmachines/{name}"


def merge(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


def annotate(name: str) -> str:
    return merge({"metadata": {"annotations": {"test.virtfleet.io/probe": name}}})


def refused(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "ValidatingAdmissionPolicy" in result.stderr, result.stderr  # not RBAC
    assert words in result.stderr, result.stderr


def admitted(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


@pytest.fixture
def placed(system: Cluster, namespace: str) -> dict[str, str]:
    """A halted VM placed on each node (no guest needed: writes are what is tested)."""
    names = {NODE_A: "on-a", NODE_B: "on-b"}
    for node, name in names.items():
        system.apply(vm_manifest(name, namespace, nodeName=node, runStrategy="Halted"))

    def placed_and_reported() -> bool:
        for node, name in names.items():
            vm = system.get("vm", name, namespace)
            status = vm.get("status") or {}
            if status.get("nodeName") != node or not status.get("printableStatus"):
                return False
        return True

    wait_for(placed_and_reported, 90, 0.5, "both VMs placed and reported by their agents")
    return names


def test_agent_cannot_write_another_nodes_vm(
    system: Cluster, namespace: str, placed: dict[str, str]
) -> None:
    theirs, ours = placed[NODE_B], placed[NODE_A]
    ns = ("-n", namespace)
    refused(
        as_agent(system, NODE_A, "patch", "vm", theirs, *ns, "--type=merge", "-p", annotate("x")),
        f"may only write VirtualMachines placed on it; {namespace}/{theirs} is on {NODE_B}",
    )
    # Stealing it (relabelling to itself) is a write to node-b's VM too.
    steal = merge({"metadata": {"labels": {"virtfleet.io/node": NODE_A}}})
    refused(
        as_agent(system, NODE_A, "patch", "vm", theirs, *ns, "--type=merge", "-p", steal),
        "may only write VirtualMachines placed on it",
    )
    refused(
        patch_status_as(system, NODE_A, vm_path(namespace, theirs), {"printableStatus": "Stopped"}),
        "may only write VirtualMachines placed on it",
    )
    vm = system.get("vm", theirs, namespace)
    assert vm["metadata"]["labels"]["virtfleet.io/node"] == NODE_B
    assert "test.virtfleet.io/probe" not in (vm["metadata"].get("annotations") or {})

    # Its own VM: metadata and status both admitted.
    admitted(
        as_agent(system, NODE_A, "patch", "vm", ours, *ns, "--type=merge", "-p", annotate("ok"))
    )
    current = system.get("vm", ours, namespace)["status"]["printableStatus"]
    admitted(
        patch_status_as(system, NODE_A, vm_path(namespace, ours), {"printableStatus": current})
    )
    annotations = system.get("vm", ours, namespace)["metadata"]["annotations"]
    assert annotations["test.virtfleet.io/probe"] == "ok"


def test_agent_cannot_write_another_nodes_vmhost(system: Cluster) -> None:
    refused(
        as_agent(system, NODE_A, "patch", "vmhost", NODE_B, "--type=merge", "-p", annotate("x")),
        f"may only write its own VMHost, not {NODE_B}",
    )
    beat = system.get("vmhost", NODE_B)["status"]["heartbeatTime"]
    refused(
        patch_status_as(
            system, NODE_A, f"/apis/virtfleet.io/v1alpha1/vmhosts/{NODE_B}", {"heartbeatTime": beat}
        ),
        "may only write its own VMHost",
    )
    fake = {"apiVersion": "virtfleet.io/v1alpha1", "kind": "VMHost", "metadata": {"name": "node-z"}}
    refused(
        as_agent(system, NODE_A, "create", "-f", "-", input=merge(fake)),
        "may only write its own VMHost, not node-z",
    )
    admitted(
        as_agent(system, NODE_A, "patch", "vmhost", NODE_A, "--type=merge", "-p", annotate("ok"))
    )


def test_agent_cannot_write_another_nodes_snapshot_or_migration(
    system: Cluster, namespace: str
) -> None:
    """Labelled for node-b: node-a's agent can neither write nor claim them (backups too)."""
    snapshot = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMSnapshot",
        "metadata": {"name": "theirs", "namespace": namespace,
                     "labels": {"virtfleet.io/node": NODE_B}},
        "spec": {"vmName": "absent"},
    }  # fmt: skip
    system.apply(snapshot)
    ns = ("-n", namespace)
    claim = merge({"metadata": {"labels": {"virtfleet.io/node": NODE_A}}})
    refused(
        as_agent(system, NODE_A, "patch", "vmsnapshot", "theirs", *ns, "--type=merge", "-p", claim),
        f"may only write snapshots, restores and backups of its node; {namespace}/theirs is on "
        f"{NODE_B}",
    )
    backup = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMBackup",
        "metadata": {"name": "theirs", "namespace": namespace,
                     "labels": {"virtfleet.io/node": NODE_B}},
        "spec": {"vmName": "absent", "location": "default"},
    }  # fmt: skip
    system.apply(backup)
    refused(
        as_agent(system, NODE_A, "patch", "vmbackup", "theirs", *ns, "--type=merge", "-p", claim),
        f"may only write snapshots, restores and backups of its node; {namespace}/theirs is on "
        f"{NODE_B}",
    )
    migration = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMMigration",
        "metadata": {"name": "theirs", "namespace": namespace},
        "spec": {"vmName": "absent"},
    }
    system.apply(migration)
    refused(
        as_agent(system, NODE_A, "patch", "vmmigration", "theirs", *ns, "--type=merge",
                 "-p", annotate("x")),
        "may only write VMMigrations out of its node",
    )  # fmt: skip


def test_token_not_bound_to_a_node_is_refused(
    system: Cluster, namespace: str, tmp_path: Path
) -> None:
    namespace_of_agent = rbac.apply_rbac(system.env)[rbac.AGENT_ACCOUNT]
    token = system.kubectl(
        "-n", namespace_of_agent, "create", "token", rbac.AGENT_ACCOUNT, "--duration", "10m"
    ).stdout.strip()
    kubeconfig = controlplane.kubeconfig_for_token(
        tmp_path / "unbound.kubeconfig",
        system.env["KUBE_APISERVER"],
        controlplane.ca_file(system.state_dir),
        token,
    )
    result = system.kubectl(
        "--kubeconfig", str(kubeconfig), "patch", "vmhost", NODE_A, "--type=merge",
        "-p", annotate("x"), check=False,
    )  # fmt: skip
    refused(result, "service-account token bound to its Node")
    # Reads are not writes: RBAC still lets it list (the policy guards writes only).
    listed = system.kubectl("--kubeconfig", str(kubeconfig), "get", "vmhost", check=False)
    assert listed.returncode == 0, listed.stderr


def test_policy_is_installed_and_type_checked(system: Cluster) -> None:
    name = f"{rbac.AGENT_ACCOUNT}-node-restriction"

    def checked() -> bool:
        policy = system.get("validatingadmissionpolicy", name)
        return bool(policy.get("status", {}).get("observedGeneration"))

    wait_for(checked, 30, 0.5, "the policy's type check")
    policy = system.get("validatingadmissionpolicy", name)
    warnings = (policy["status"].get("typeChecking") or {}).get("expressionWarnings") or []
    assert warnings == []


def test_agent_renews_only_its_own_lease_and_cannot_touch_its_fence_mark(system: Cluster) -> None:
    """The heartbeat Lease is the fencing record (docs/failover.md): an agent may renew
    its own, never another node's, and never write the controller's fence mark."""

    def patch_lease(node: str, body: str) -> subprocess.CompletedProcess[str]:
        lease = f"virtfleet-agent-{node}"
        return as_agent(
            system, NODE_A, "patch", "lease", lease, "-n", "kube-node-lease", "--type=merge",
            "-p", body,
        )  # fmt: skip

    refused(patch_lease(NODE_B, annotate("x")), "may only renew its own Lease")
    mark = merge({"metadata": {"annotations": {"virtfleet.io/fenced": "{}"}}})
    refused(patch_lease(NODE_A, mark), "and not change its fence mark")
    admitted(patch_lease(NODE_A, annotate("ok")))
