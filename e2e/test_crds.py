"""The generated CRDs on a real apiserver: installed, printed, and refusing bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from harness.testing import Cluster
from virtfleet.api.resources import KINDS

REPO = Path(__file__).resolve().parents[1]
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))
VALID = sorted((REPO / "examples").glob("*.yaml"))


def cel_messages() -> set[str]:
    """Every message a CEL rule in the models can produce (the apiserver must say them)."""
    found: set[str] = set()
    seen: set[type] = set()

    def visit(model: type) -> None:
        if model in seen or not hasattr(model, "model_fields"):
            return
        seen.add(model)
        for rule in model.__dict__.get("cel_rules", ()):
            if rule.rule is not None:
                found.add(rule.message)
        for info in model.model_fields.values():
            for arg in _types(info.annotation):
                visit(arg)

    for kind in KINDS:
        visit(kind.spec_model)
        found.update(r.message for r in kind.root_rules)
    return found


def _types(annotation: object) -> list[type]:
    args = getattr(annotation, "__args__", ())
    out = [a for a in args for a in ([a] if isinstance(a, type) else _types(a))]
    return [annotation, *out] if isinstance(annotation, type) else out


def test_all_kinds_are_served(cluster: Cluster) -> None:
    out = cluster.kubectl("api-resources", "--api-group=virtfleet.io", "--no-headers").stdout
    served = {line.split()[0]: line for line in out.splitlines()}
    for kind in KINDS:
        assert kind.plural in served, out
        assert kind.short_names[0] in served[kind.plural]
    # the category lists them all
    cluster.kubectl("get", "virtfleet", "-A")


def test_get_vm_prints_the_first_answers(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "columns", "namespace": namespace},
            "spec": {"memory": {"size": "64Mi"}, "runStrategy": "Halted"},
        }
    )
    header = cluster.kubectl("get", "vm", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "STATUS", "NODE", "READY", "AGE"]
    wide = cluster.kubectl("get", "vm", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == [
        "NAME",
        "STATUS",
        "NODE",
        "READY",
        "AGE",
        "STRATEGY",
        "MEMORY",
        "RESTARTS",
        "IP",
        "OS",
        "FAILEDOVER",
    ]
    assert re.search(r"columns\s+.*Halted\s+64Mi", "\n".join(wide))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_examples_are_accepted(cluster: Cluster, namespace: str, path: Path) -> None:
    text = (
        path.read_text()
        .replace("namespace: default", f"namespace: {namespace}")
        .replace("namespace: shop", f"namespace: {namespace}")
    )
    cluster.apply(text, "--dry-run=server")


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_examples_are_refused_with_the_models_message(
    cluster: Cluster, namespace: str, path: Path
) -> None:
    text = path.read_text().replace("namespace: default", f"namespace: {namespace}")
    result = cluster.apply(text, "--dry-run=server", check=False)
    assert result.returncode != 0, f"the apiserver accepted {path.name}"
    expected = re.findall(r"^# expect: (?:[^:]*: )?(.*)$", path.read_text(), flags=re.M)
    for message in expected:
        if message in cel_messages():
            assert message in result.stderr, result.stderr


def test_one_shot_specs_are_immutable(cluster: Cluster, namespace: str) -> None:
    restore = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMRestore",
        "metadata": {"name": "once", "namespace": namespace},
        "spec": {"vmName": "demo", "snapshotName": "s1"},
    }
    cluster.apply(restore)
    restore["spec"]["snapshotName"] = "s2"  # type: ignore[index]
    result = cluster.apply(restore, check=False)
    assert result.returncode != 0
    assert "spec is immutable; create a new object instead" in result.stderr


SUBNET_FIXED = "subnet cannot change once set (it would renumber running VMs); create another VMNetwork instead"  # noqa: E501


def test_a_networks_vni_and_subnet_cannot_change(cluster: Cluster, namespace: str) -> None:
    network: dict[str, Any] = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMNetwork",
        "metadata": {"name": f"fixed-{namespace}"[:63]},
        "spec": {"namespaces": [namespace], "vni": 7001, "subnet": "10.90.0.0/24"},
    }
    cluster.apply(network)
    try:
        for field, value, message in (
            ("vni", 7002, "vni cannot change once set; create another VMNetwork instead"),
            ("subnet", "10.91.0.0/24", SUBNET_FIXED),
        ):
            changed = {**network, "spec": {**network["spec"], field: value}}
            result = cluster.apply(changed, check=False)
            assert result.returncode != 0, f"{field} changed"
            assert message in result.stderr, result.stderr
    finally:
        cluster.kubectl("delete", "vmnetwork", network["metadata"]["name"], "--wait=false")


def dry_run_status_patch(
    cluster: Cluster, resource: str, name: str, namespace: str, patch: dict[str, Any]
) -> dict[str, Any]:
    """What the apiserver would store for a status-subresource merge patch (nothing is stored,
    so operators running meanwhile cannot race the answer)."""
    out = cluster.kubectl(
        "patch", resource, name, "-n", namespace, "--subresource=status", "--type=merge",
        "--dry-run=server", "-o", "json", "-p", json.dumps(patch),
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


def test_status_is_a_subresource(cluster: Cluster, namespace: str) -> None:
    # Server-side dry runs: the apiserver answers with what it would store, and the
    # operators (running when other tests started them) cannot race the answer.
    manifest = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "sub", "namespace": namespace},
        "spec": {"memory": {"size": "64Mi"}, "runStrategy": "Halted"},
        "status": {"printableStatus": "Running"},
    }
    stored = json.loads(cluster.apply(manifest, "--dry-run=server", "-o", "json").stdout)
    assert "printableStatus" not in (stored.get("status") or {})  # status ignored on create
    cluster.apply(manifest)
    patched = dry_run_status_patch(
        cluster,
        "vm",
        "sub",
        namespace,
        {"status": {"printableStatus": "Stopped", "nodeName": "node-a"}},
    )
    assert patched["status"]["printableStatus"] == "Stopped"
    assert patched["status"]["nodeName"] == "node-a"
    assert patched["metadata"]["generation"] == 1  # status writes never bump generation
    spec_via_status = dry_run_status_patch(
        cluster, "vm", "sub", namespace, {"spec": {"runStrategy": "Always"}}
    )
    assert spec_via_status["spec"]["runStrategy"] == "Halted"  # spec is not writable there


def test_unknown_status_fields_are_pruned(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMSnapshot",
            "metadata": {"name": "snap", "namespace": namespace},
            "spec": {"vmName": "demo"},
        }
    )
    # A server-side dry run answers with what would be stored; the controller (which gives
    # a snapshot of a missing VM a waiting status) cannot race the answer.
    patched = dry_run_status_patch(
        cluster,
        "vmsnap",
        "snap",
        namespace,
        {"status": {"phase": "Ready", "handlerResult": {"x": 1}}},
    )
    status = patched["status"]
    assert status["phase"] == "Ready"
    assert "handlerResult" not in status
