"""Tenant guards on the real apiserver: status and placement are virtfleet's own.

A tenant here is a ServiceAccount with a namespaced Role granting ``virtfleet.io``
resources ``["*"]`` verbs ``["*"]`` — which RBAC extends to every subresource, status
included. The chart's two ValidatingAdmissionPolicies (``virtfleet-status-writers``,
``virtfleet-placement-label``) refuse such a tenant what only virtfleet may write: the
status virtfleet acts on (the snapshot XML a restore redefines, ``nodeName``) and the
``virtfleet.io/node`` label. The rest of the suite runs with both policies installed
(``harness.rbac``), which proves the agents and the controller are still admitted; here a
placed and reported VM proves it again, and an admin's label (``system:masters`` is let
through, for repairs) proves the agent still waits for the controller's placement.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import controlplane
from harness.testing import Cluster, domain_name, poll, vm_manifest, wait_for

STATUS_POLICY = "virtfleet-status-writers"
LABEL_POLICY = "virtfleet-placement-label"
NODE_LABEL = "virtfleet.io/node"
NOWHERE = {"virtfleet.test/zone": "nowhere"}  # a nodeSelector no node matches
HOSTILE_XML = (
    "<domainsnapshot><name>vf-x</name><domain type='qemu'><devices>"
    "<hostdev mode='subsystem' type='pci'/></devices></domain></domainsnapshot>"
)


class Tenant:
    """kubectl as the tenant ServiceAccount of one namespace."""

    def __init__(self, system: Cluster, namespace: str, kubeconfig: Path) -> None:
        self.system, self.namespace, self.kubeconfig = system, namespace, kubeconfig

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.system.kubectl(
            "--kubeconfig", str(self.kubeconfig), "-n", self.namespace, *args,
            input=input, check=False,
        )  # fmt: skip

    def create(self, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(obj))

    def patch_status(self, kind: str, name: str, status: dict[str, Any]) -> Any:
        patch = json.dumps({"status": status})
        return self.kubectl(
            "patch", kind, name, "--subresource=status", "--type=merge", "-p", patch
        )


@pytest.fixture
def tenant(system: Cluster, namespace: str, tmp_path: Path) -> Iterator[Tenant]:
    name = "tenant"
    rules = [{"apiGroups": ["virtfleet.io"], "resources": ["*"], "verbs": ["*"]}]
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
        # VMHosts are cluster-scoped: a ClusterRole lets the tenant reach their status too.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": f"{namespace}-vmhosts"},
         "rules": [{"apiGroups": ["virtfleet.io"], "resources": ["vmhosts", "vmhosts/status"],
                    "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{namespace}-vmhosts"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": f"{namespace}-vmhosts"},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]  # fmt: skip
    system.apply({"apiVersion": "v1", "kind": "List", "items": objects})
    token = system.kubectl("-n", namespace, "create", "token", name, "--duration", "1h")
    kubeconfig = controlplane.kubeconfig_for_token(
        tmp_path / "tenant.kubeconfig",
        system.env["KUBE_APISERVER"],
        controlplane.ca_file(system.state_dir),
        token.stdout.strip(),
    )
    yield Tenant(system, namespace, kubeconfig)
    for kind in ("clusterrolebinding", "clusterrole"):
        system.kubectl("delete", kind, f"{namespace}-vmhosts", "--ignore-not-found", check=False)


def refused(result: subprocess.CompletedProcess[str], policy: str, words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert f"ValidatingAdmissionPolicy '{policy}'" in result.stderr, result.stderr  # not RBAC
    assert words in result.stderr, result.stderr


def admitted(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def labelled(kind: str, name: str, namespace: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        # A VM that does not exist: no agent acts on these, only the controller says why.
        "spec": {"vmName": "absent", **({"snapshotName": "s"} if kind == "VMRestore" else {})},
    }


def placed_and_reported(system: Cluster, namespace: str, name: str, node: str) -> dict[str, Any]:
    """The controller placed it (status, label), then the agent reported it: both admitted."""

    def ready() -> dict[str, Any] | None:
        vm = system.get("vm", name, namespace)
        status = vm.get("status") or {}
        reported = status.get("observedGeneration") and status.get("printableStatus") == "Stopped"
        on_node = (
            status.get("nodeName") == node and vm["metadata"]["labels"].get(NODE_LABEL) == node
        )
        return vm if reported and on_node else None

    result: dict[str, Any] = wait_for(ready, 90, 0.5, f"{name} placed on {node} and reported")
    return result


def test_policies_are_installed_and_type_checked(system: Cluster) -> None:
    for name in (STATUS_POLICY, LABEL_POLICY):

        def checked(name: str = name) -> bool:
            policy = system.get("validatingadmissionpolicy", name)
            return bool(policy.get("status", {}).get("observedGeneration"))

        wait_for(checked, 30, 0.5, f"the type check of {name}")
        policy = system.get("validatingadmissionpolicy", name)
        assert (policy["status"].get("typeChecking") or {}).get("expressionWarnings") in (None, [])


def test_a_tenant_cannot_write_status(system: Cluster, namespace: str, tenant: Tenant) -> None:
    admitted(tenant.create(vm_manifest("vm", namespace, nodeName="node-a", runStrategy="Halted")))
    vm = placed_and_reported(system, namespace, "vm", "node-a")
    why = "is written by virtfleet (its agents and controller) only"
    refused(tenant.patch_status("vm", "vm", {"nodeName": "node-b"}), STATUS_POLICY, why)

    # Snapshots, restores and migrations: no agent or controller may be lied to.
    admitted(tenant.create(labelled("VMSnapshot", "s", namespace)))
    admitted(tenant.create(labelled("VMRestore", "r", namespace)))
    admitted(tenant.create(labelled("VMMigration", "m", namespace)))
    uid = vm["metadata"]["uid"]
    forged = {"phase": "Ready", "readyToUse": True, "vmUID": uid, "snapshotName": "vf-x",
              "snapshotXML": HOSTILE_XML}  # fmt: skip
    refused(tenant.patch_status("vmsnapshot", "s", forged), STATUS_POLICY, "vmsnapshots")
    refused(tenant.patch_status("vmrestore", "r", {"phase": "Succeeded"}), STATUS_POLICY, why)
    refused(tenant.patch_status("vmmigration", "m", {"sourceNode": "node-b"}), STATUS_POLICY, why)
    host = tenant.kubectl("patch", "vmhost", "node-a", "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"memoryBytes": 2**50}}))  # fmt: skip
    refused(host, STATUS_POLICY, "vmhosts")

    assert system.get("vm", "vm", namespace)["status"]["nodeName"] == "node-a"
    snapshot = system.get("vmsnapshot", "s", namespace)
    assert "snapshotXML" not in (snapshot.get("status") or {})
    assert system.get("vmhost", "node-a")["status"]["memoryBytes"] < 2**50

    # A cluster admin (system:masters) is let through, for repairs (dry run: no change).
    admin = system.kubectl(
        "patch", "vmsnapshot", "s", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": forged}), "--dry-run=server", check=False,
    )  # fmt: skip
    admitted(admin)


def test_a_create_cannot_carry_status(system: Cluster, namespace: str, tenant: Tenant) -> None:
    """The apiserver drops status from a create (status subresource): nothing to admit."""
    body = vm_manifest("pre-placed", namespace, nodeSelector=NOWHERE)
    body["status"] = {"nodeName": "node-a", "printableStatus": "Running"}
    created = tenant.create(body)
    admitted(created)
    assert "nodeName" not in (json.loads(created.stdout).get("status") or {})


def test_a_tenant_cannot_place_by_label(system: Cluster, namespace: str, tenant: Tenant) -> None:
    body = vm_manifest("squatter", namespace, nodeSelector=NOWHERE)
    body["metadata"]["labels"] = {NODE_LABEL: "node-a"}
    refused(tenant.create(body), LABEL_POLICY, "remove it from the manifest")
    for kind in ("VMSnapshot", "VMRestore", "VMMigration"):
        obj = labelled(kind, "claimed", namespace, **{NODE_LABEL: "node-a"})
        refused(tenant.create(obj), LABEL_POLICY, "the agent of the VM's node sets it")

    # Not placeable: the controller says so, and the tenant cannot add the label later.
    del body["metadata"]["labels"]
    admitted(tenant.kubectl("apply", "-f", "-", input=json.dumps(body)))
    add = tenant.kubectl("label", "vm", "squatter", f"{NODE_LABEL}=node-a")
    refused(add, LABEL_POLICY, "only virtfleet may add, change or remove it")
    admitted(tenant.kubectl("label", "vm", "squatter", "team=blue"))  # other labels are theirs

    # Placed by the controller: the tenant can neither move it nor remove the label, but
    # re-applying the manifest (a GitOps sync) keeps the label and is admitted.
    placed = vm_manifest("placed", namespace, nodeName="node-a", runStrategy="Halted")
    admitted(tenant.kubectl("apply", "-f", "-", input=json.dumps(placed)))
    placed_and_reported(system, namespace, "placed", "node-a")
    move = tenant.kubectl("label", "vm", "placed", "--overwrite", f"{NODE_LABEL}=node-b")
    refused(move, LABEL_POLICY, "move a VM with a VMMigration")
    refused(tenant.kubectl("label", "vm", "placed", f"{NODE_LABEL}-"), LABEL_POLICY, "remove")
    placed["metadata"]["annotations"] = {"virtfleet.test/synced": "2"}
    admitted(tenant.kubectl("apply", "-f", "-", input=json.dumps(placed)))
    assert system.get("vm", "placed", namespace)["metadata"]["labels"][NODE_LABEL] == "node-a"

    squatter = system.get("vm", "squatter", namespace)
    assert NODE_LABEL not in squatter["metadata"]["labels"]
    assert squatter["metadata"]["labels"]["team"] == "blue"


def test_a_label_without_placement_runs_nothing(system: Cluster, namespace: str) -> None:
    """Even a label the guard let through (an admin's) does not make a node's agent act."""
    body = vm_manifest("labelled", namespace, nodeSelector=NOWHERE, runStrategy="Always")
    body["metadata"]["labels"] = {NODE_LABEL: "node-a"}
    system.apply(body)

    def scheduling() -> bool:
        status = system.get("vm", "labelled", namespace).get("status") or {}
        return status.get("printableStatus") == "Scheduling"

    wait_for(scheduling, 30, 0.5, "the controller's Scheduling status")
    node = system.node("node-a")
    dom = domain_name(namespace, "labelled")

    def defined() -> bool:
        out = subprocess.run(
            ["virsh", "-q", "-c", node.uri, "list", "--all", "--name"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        return dom in out.split()

    assert poll(defined, 8, 0.5) is None, "node-a's agent defined a VM it was not given"
    status = system.get("vm", "labelled", namespace).get("status") or {}
    assert "nodeName" not in status  # no agent reported it as its own
    assert status["printableStatus"] == "Scheduling"
    # Its deletion is not held up by the labelled node's agent.
    system.kubectl("delete", "vm", "labelled", "-n", namespace, "--timeout=30s")
