"""The Helm chart, rendered by the pinned helm (built from the Go module proxy, cached).

What is checked here needs no cluster: lint, the values schema refusing bad values,
least-privilege RBAC (no wildcards), Pod Security of both pods, and that the rendered
arguments are ones the ``virtfleet`` CLI accepts. e2e/test_chart.py applies the same
rendering to a real apiserver and runs the processes with the chart's RBAC.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import helm as hh
from virtfleet import crdgen
from virtfleet.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "virtfleet"


def render(*sets: str, check: bool = True, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    args = ["template", "virtfleet", str(CHART), *extra]
    for item in sets:
        args += ["--set", item]
    result = hh.helm(*args, check=check)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


#: What the kubelet puts for the fieldRefs the chart's containers use.
FIELD_VALUES = {"status.hostIP": "192.0.2.21", "spec.nodeName": "node-a"}


def kubelet_expanded(container: dict[str, Any]) -> list[str]:
    """The container's args as the kubelet runs them: ``$(VAR)`` of its env expanded."""
    values = {
        e["name"]: FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in container.get("env", ())
        if "fieldRef" in e.get("valueFrom", {})
    }
    return [
        re.sub(r"\$\(([A-Z_]+)\)", lambda m: values.get(m[1], m[0]), a) for a in container["args"]
    ]


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


def test_lint_strict() -> None:
    result = hh.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_default_objects(default: list[dict[str, Any]]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in default)
    assert kinds == [
        ("ClusterRole", "virtfleet-agent"),
        ("ClusterRole", "virtfleet-console"),
        ("ClusterRole", "virtfleet-controller"),
        ("ClusterRoleBinding", "virtfleet-agent"),
        ("ClusterRoleBinding", "virtfleet-controller"),
        ("DaemonSet", "virtfleet-agent"),
        ("Deployment", "virtfleet-controller"),
        ("Namespace", "virtfleet-agent"),
        ("Namespace", "virtfleet-system"),
        ("RoleBinding", "virtfleet-agent-client-ca"),
        ("Service", "virtfleet-agent-metrics"),
        ("Service", "virtfleet-controller-metrics"),
        ("ServiceAccount", "virtfleet-agent"),
        ("ServiceAccount", "virtfleet-controller"),
        ("ValidatingAdmissionPolicy", "virtfleet-agent-node-restriction"),
        ("ValidatingAdmissionPolicy", "virtfleet-placement-label"),
        ("ValidatingAdmissionPolicy", "virtfleet-status-writers"),
        ("ValidatingAdmissionPolicyBinding", "virtfleet-agent-node-restriction"),
        ("ValidatingAdmissionPolicyBinding", "virtfleet-placement-label"),
        ("ValidatingAdmissionPolicyBinding", "virtfleet-status-writers"),
    ]


def test_crds_ship_with_the_chart() -> None:
    docs = render(extra=("--include-crds",))
    names = sorted(d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition"))
    assert names == sorted(n.removesuffix(".yaml") for n in crdgen.render_all())


def test_namespaces_are_labelled_for_pod_security(default: list[dict[str, Any]]) -> None:
    levels = {
        ns["metadata"]["name"]: ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for ns in by_kind(default, "Namespace")
    }
    assert levels == {"virtfleet-agent": "privileged", "virtfleet-system": "restricted"}
    assert by_kind(render("namespaces.create=false"), "Namespace") == []


@pytest.mark.parametrize(
    "sets", [(), ("controller.watchNamespaces={a,b-*}", "controller.peering.enabled=true")]
)
def test_rbac_has_no_wildcards(sets: tuple[str, ...]) -> None:
    for role in by_kind(render(*sets), "ClusterRole"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)
            forbidden = {"delete", "deletecollection", "update", "escalate", "bind"}
            if rule["resources"] == ["vmbackups"]:
                # The one deletion virtfleet makes: a schedule's retention prunes the
                # VMBackups it made (their data goes behind the backup-objects finalizer).
                forbidden.discard("delete")
            assert not forbidden & set(rule["verbs"]), rule


def rules(docs: list[dict[str, Any]], name: str) -> set[tuple[str, str, str]]:
    role = one(docs, "ClusterRole", name)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_controller_rights(default: list[dict[str, Any]]) -> None:
    granted = rules(default, "virtfleet-controller")
    assert ("virtfleet.io", "virtualmachines/status", "patch") in granted
    assert ("", "nodes", "watch") in granted
    assert ("virtfleet.io", "vmnetworks", "patch") in granted  # its finalizer
    assert ("virtfleet.io", "vmnetworks/status", "patch") in granted
    assert not {r for r in granted if r[1] in {"pods", "namespaces"}}
    # Secrets: get only (a VMBackupLocation's credentials), and none when switched off.
    assert {r for r in granted if r[1] == "secrets"} == {("", "secrets", "get")}
    assert not {
        r
        for r in rules(render("controller.rbac.readSecrets=false"), "virtfleet-controller")
        if r[1] == "secrets"
    }
    assert ("", "namespaces", "list") in rules(
        render("controller.watchNamespaces={apps}"), "virtfleet-controller"
    )


def test_agent_rights(default: list[dict[str, Any]]) -> None:
    granted = rules(default, "virtfleet-agent")
    assert ("virtfleet.io", "vmhosts", "create") in granted
    assert {r for r in granted if r[1].startswith("vmnetworks")} == {
        ("virtfleet.io", "vmnetworks", verb) for verb in ("get", "list", "watch")
    }
    assert ("", "secrets", "get") in granted
    assert ("", "secrets", "list") not in granted
    assert ("", "secrets", "get") not in rules(
        render("agent.rbac.readSecrets=false"), "virtfleet-agent"
    )


def test_controller_pod_is_restricted(default: list[dict[str, Any]]) -> None:
    pod = one(default, "Deployment", "virtfleet-controller")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not [v for v in pod.get("volumes", []) if "hostPath" in v]
    assert one(default, "Deployment", "virtfleet-controller")["spec"]["replicas"] == 1


def test_agent_pod(default: list[dict[str, Any]]) -> None:
    pod = one(default, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {
        "/var/run/libvirt",
        "/var/lib/libvirt",
        "/var/log/libvirt/virtfleet-serial",
        "/run/virtfleet/networks",  # the VMNetworks' DHCP servers' files
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    assert pod["nodeSelector"] == {"virtfleet.io/hypervisor": "true"}


@pytest.mark.parametrize(
    "sets", [(), ("agent.pools={a,b}", "controller.watchNamespaces={x}", "agent.domainType=qemu")]
)
def test_rendered_args_are_accepted_by_the_cli(sets: tuple[str, ...]) -> None:
    docs = render(*sets)
    for kind, name in (("DaemonSet", "virtfleet-agent"), ("Deployment", "virtfleet-controller")):
        (container,) = one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
        args = build_parser().parse_args(kubelet_expanded(container))
        assert args.command == container["args"][0]
    agent = one(docs, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]["containers"]
    parsed = build_parser().parse_args(kubelet_expanded(agent[0]))
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    assert parsed.console_listen == "192.0.2.21:8450"  # the node's address (hostNetwork)
    assert parsed.metrics_listen == "192.0.2.21:9470"
    (controller,) = one(docs, "Deployment", "virtfleet-controller")["spec"]["template"]["spec"][
        "containers"
    ]
    assert build_parser().parse_args(kubelet_expanded(controller)).metrics_listen == "0.0.0.0:9471"


def test_metrics_services_select_their_pods_and_monitors_are_opt_in(
    default: list[dict[str, Any]],
) -> None:
    for component in ("agent", "controller"):
        service = one(default, "Service", f"virtfleet-{component}-metrics")
        pods = one(
            default, "DaemonSet" if component == "agent" else "Deployment", f"virtfleet-{component}"
        )["spec"]["template"]
        assert service["spec"]["selector"].items() <= pods["metadata"]["labels"].items()
        (container,) = pods["spec"]["containers"]
        assert "metrics" in [p["name"] for p in container["ports"]]
    assert not by_kind(default, "ServiceMonitor")
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=x")
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    assert all(m["metadata"]["labels"]["release"] == "x" for m in monitors)
    rule = by_kind(render("metrics.prometheusRule.enabled=true"), "PrometheusRule")
    (group,) = rule[0]["spec"]["groups"]
    assert "VirtfleetVMNotReady" in [r["alert"] for r in group["rules"]]
    assert "{{ $labels.namespace }}" in group["rules"][0]["annotations"]["summary"]
    (board,) = by_kind(render("metrics.dashboard.enabled=true"), "ConfigMap")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["virtfleet.json"])["uid"] == "virtfleet-overview"
    off = render("metrics.enabled=false")
    assert not by_kind(off, "Service")
    (agent,) = one(off, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(kubelet_expanded(agent)).metrics_listen is None


def test_the_console_can_be_turned_off_with_its_rights() -> None:
    docs = render("agent.console.enabled=false")
    (agent,) = one(docs, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(kubelet_expanded(agent)).console_listen is None
    rules = one(docs, "ClusterRole", "virtfleet-agent")["rules"]
    assert not [r for r in rules if "tokenreviews" in r["resources"]]
    assert not by_kind(docs, "RoleBinding")
    assert ("ClusterRole", "virtfleet-console") not in {
        (d["kind"], d["metadata"]["name"]) for d in docs
    }


def test_console_users_get_it_with_edit_unless_told_not_to(default: list[dict[str, Any]]) -> None:
    role = one(default, "ClusterRole", "virtfleet-console")
    assert role["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert {"apiGroups": ["virtfleet.io"], "resources": ["virtualmachines/console"],
            "verbs": ["get"]} in role["rules"]  # fmt: skip
    docs = render("agent.console.aggregateToEdit=false")
    labels = one(docs, "ClusterRole", "virtfleet-console")["metadata"]["labels"]
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in labels


def test_image_digest_wins_over_tag(default: list[dict[str, Any]]) -> None:
    ds = one(default, "DaemonSet", "virtfleet-agent")
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0")
    digest = "sha256:" + "a" * 64
    docs = render(f"image.digest={digest}")
    image = one(docs, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]["containers"][0]
    assert image["image"] == f"ghcr.io/virtfleet/virtfleet@{digest}"


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        ("agent.bogus=1", "Additional property bogus is not allowed"),
        ("controller.replicas=2", "less than or equal to 1"),
        ("agent.domainType=xen", "agent.domainType"),
        ("image.digest=latest", "image.digest"),
        ("agent.workers=0", "agent.workers"),
        ("agent.serialLogDir=relative/path", "agent.serialLogDir"),
    ],
)
def test_schema_refuses_bad_values(sets: str, complaint: str) -> None:
    result = hh.helm("template", "virtfleet", str(CHART), "--set", sets, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_peering_allows_replicas() -> None:
    docs = render("controller.replicas=2", "controller.peering.enabled=true")
    deployment = one(docs, "Deployment", "virtfleet-controller")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--peering=virtfleet-controller" in container["args"]


def test_argocd_health_configmap_carries_every_script() -> None:
    docs = render("argocd.healthChecks=true")
    (cm,) = by_kind(docs, "ConfigMap")
    for path in (CHART / "health").glob("*/*/health.lua"):
        key = f"resource.customizations.health.{path.parent.parent.name}_{path.parent.name}"
        assert cm["data"][key] == path.read_text()


def test_agent_node_restriction_policy(default: list[dict[str, Any]]) -> None:
    """The policy matches exactly the agent's ServiceAccount and can be switched off."""
    policy = one(default, "ValidatingAdmissionPolicy", "virtfleet-agent-node-restriction")
    (condition,) = policy["spec"]["matchConditions"]
    sa = one(default, "ServiceAccount", "virtfleet-agent")["metadata"]
    subject = f"system:serviceaccount:{sa['namespace']}:{sa['name']}"
    assert condition["expression"] == f'request.userInfo.username == "{subject}"'
    binding = one(default, "ValidatingAdmissionPolicyBinding", "virtfleet-agent-node-restriction")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    guarded = set(policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"])
    agent_role = one(default, "ClusterRole", "virtfleet-agent")
    writable = {
        resource
        for rule in agent_role["rules"]
        if rule["apiGroups"] == ["virtfleet.io"] and {"patch", "create"} & set(rule["verbs"])
        for resource in rule["resources"]
    }
    assert writable <= guarded  # every virtfleet.io object the agent may write is guarded
    off = render("agent.nodeRestriction.enabled=false")
    names = {d["metadata"]["name"] for d in by_kind(off, "ValidatingAdmissionPolicy")}
    assert policy["metadata"]["name"] not in names


def test_tenant_guards(default: list[dict[str, Any]]) -> None:
    """Status of every virtfleet kind, and the node label, are the two ServiceAccounts'.

    e2e/test_admission.py runs them on the real apiserver; here: what they match, whom
    they let through, and that they can be switched off or trust other groups.
    """
    crds = {path.stem.split(".")[0] for path in (REPO / "crds").glob("*.yaml")}
    accounts = {
        f"system:serviceaccount:{d['metadata']['namespace']}:{d['metadata']['name']}"
        for d in by_kind(default, "ServiceAccount")
    }
    status = one(default, "ValidatingAdmissionPolicy", "virtfleet-status-writers")["spec"]
    (rule,) = status["matchConstraints"]["resourceRules"]
    assert set(rule["resources"]) == {f"{plural}/status" for plural in crds}
    placement = one(default, "ValidatingAdmissionPolicy", "virtfleet-placement-label")["spec"]
    (rule,) = placement["matchConstraints"]["resourceRules"]
    assert set(rule["resources"]) == crds - {"vmhosts"}
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    for spec in (status, placement):
        conditions = {c["name"]: c["expression"] for c in spec["matchConditions"]}
        assert all(account in conditions["not-virtfleet"] for account in accounts)
        assert '["system:masters"]' in conditions["not-trusted"]
        assert spec["failurePolicy"] == "Fail"
    for name in ("virtfleet-status-writers", "virtfleet-placement-label"):
        binding = one(default, "ValidatingAdmissionPolicyBinding", name)
        assert binding["spec"] == {"policyName": name, "validationActions": ["Deny"]}
    nobody = render(extra=("--set-json", "admission.trustedGroups=[]"))
    spec = one(nobody, "ValidatingAdmissionPolicy", "virtfleet-status-writers")["spec"]
    assert "g in []" in spec["matchConditions"][1]["expression"]
    off = render("admission.enabled=false")
    names = {d["metadata"]["name"] for d in by_kind(off, "ValidatingAdmissionPolicy")}
    assert names == {"virtfleet-agent-node-restriction"}
