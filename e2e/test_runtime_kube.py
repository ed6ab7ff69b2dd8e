"""KubeClient against the real apiserver: reads, merge patches, errors, VMHost upsert, Events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest

from harness.testing import Cluster
from virtfleet.runtime.kube import Conflict, Invalid, KubeClient, NotFound


@pytest.fixture
async def kube(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeClient]:
    monkeypatch.setenv("KUBECONFIG", cluster.env["KUBECONFIG"])
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = KubeClient(field_manager="virtfleet-e2e")
    yield api
    await api.close()


def ours(labels: dict[str, str]) -> dict[str, str]:
    """The labels this test set (a running controller adds ``virtfleet.io/node``)."""
    return {k: v for k, v in labels.items() if not k.startswith("virtfleet.io/")}


def vm(name: str) -> dict[str, object]:
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"memory": {"size": "128Mi"}},
    }


async def test_get_list_and_merge_patches(
    cluster: Cluster, namespace: str, kube: KubeClient
) -> None:
    cluster.apply(vm("one"), "-n", namespace)
    cluster.apply(vm("two"), "-n", namespace)
    got = await kube.get("VirtualMachine", namespace, "one")
    assert got["metadata"]["name"] == "one"
    items = await kube.list("VirtualMachine", namespace)
    assert sorted(i["metadata"]["name"] for i in items) == ["one", "two"]
    assert all(i["kind"] == "VirtualMachine" for i in items)

    updated = await kube.patch_status(
        "VirtualMachine", namespace, "one", {"printableStatus": "Scheduling", "nodeName": "x"}
    )
    assert updated["status"]["printableStatus"] == "Scheduling"
    updated = await kube.patch_status("VirtualMachine", namespace, "one", {"nodeName": None})
    assert "nodeName" not in updated["status"]
    assert updated["metadata"]["generation"] == 1  # status writes never touch spec

    labelled = await kube.patch_metadata(
        "VirtualMachine", namespace, "one", labels={"a": "1", "b": "2"}, annotations={"n": "x"}
    )
    assert ours(labelled["metadata"]["labels"]) == {"a": "1", "b": "2"}
    labelled = await kube.patch_metadata("VirtualMachine", namespace, "one", labels={"a": None})
    assert ours(labelled["metadata"]["labels"]) == {"b": "2"}
    selected = await kube.list("VirtualMachine", namespace, label_selector="b=2")
    assert [i["metadata"]["name"] for i in selected] == ["one"]


async def test_errors_are_mapped(cluster: Cluster, namespace: str, kube: KubeClient) -> None:
    with pytest.raises(NotFound):
        await kube.get("VirtualMachine", namespace, "missing")
    cluster.apply(vm("cas"), "-n", namespace)
    current = await kube.get("VirtualMachine", namespace, "cas")
    stale = current["metadata"]["resourceVersion"]
    await kube.patch_status("VirtualMachine", namespace, "cas", {"printableStatus": "Scheduling"})
    with pytest.raises(Conflict):
        await kube.patch_status(
            "VirtualMachine", namespace, "cas", {"nodeName": "x"}, resource_version=stale
        )
    with pytest.raises(Invalid):
        await kube.patch_status("VirtualMachine", namespace, "cas", {"printableStatus": "Bogus"})


async def test_upsert_vmhost_status_creates_then_patches(
    cluster: Cluster, kube: KubeClient
) -> None:
    name = f"e2e-kube-{uuid.uuid4().hex[:6]}"
    try:
        first = await kube.upsert_vmhost_status(name, {"cpus": 4, "memoryBytes": 2**30})
        assert first["status"] == {"cpus": 4, "memoryBytes": 2**30}
        second = await kube.upsert_vmhost_status(name, {"cpus": 8, "memoryBytes": None})
        assert second["status"] == {"cpus": 8}
        assert (await kube.get("VMHost", None, name))["status"]["cpus"] == 8
    finally:
        cluster.kubectl("delete", "vmhost", name, "--wait=false", check=False)


async def test_secrets_and_nodes(cluster: Cluster, namespace: str, kube: KubeClient) -> None:
    cluster.kubectl(
        "create", "secret", "generic", "ci", "-n", namespace, "--from-literal=userdata=#cloud"
    )
    assert await kube.get_secret_key(namespace, "ci", "userdata") == b"#cloud"
    with pytest.raises(NotFound):
        await kube.get_secret_key(namespace, "ci", "other")
    with pytest.raises(NotFound):
        await kube.get_secret_key(namespace, "nope", "userdata")
    names = {n["metadata"]["name"] for n in await kube.list_nodes()}
    assert {"node-a", "node-b"} <= names
    assert (await kube.get_node("node-a"))["metadata"]["name"] == "node-a"


async def test_events_aggregate_and_show_in_describe(
    cluster: Cluster, namespace: str, kube: KubeClient
) -> None:
    cluster.apply(vm("noisy"), "-n", namespace)
    body = await kube.get("VirtualMachine", namespace, "noisy")
    for _ in range(3):
        await kube.record_event(body, "Warning", "Unschedulable", "no room", "virtfleet-e2e")
    await kube.record_event(body, "Normal", "Scheduled", "placed on node-a", "virtfleet-e2e")
    out = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    # Only this test's own Events: a running controller/agent may record theirs too.
    events = [
        e
        for e in json.loads(out)["items"]
        if e["involvedObject"]["name"] == "noisy"
        and e["source"].get("component") == "virtfleet-e2e"
    ]
    by_reason = {e["reason"]: e for e in events}
    assert len(events) == 2
    assert by_reason["Unschedulable"]["count"] == 3
    assert by_reason["Unschedulable"]["involvedObject"]["uid"] == body["metadata"]["uid"]
    assert by_reason["Scheduled"]["count"] == 1
    # a fresh client (a restarted process) keeps aggregating into the same Event
    async with KubeClient() as again:
        await again.record_event(body, "Warning", "Unschedulable", "no room", "virtfleet-e2e")
    out = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    counts = [
        e["count"]
        for e in json.loads(out)["items"]
        if e["involvedObject"]["name"] == "noisy"
        and e["reason"] == "Unschedulable"
        and e["source"].get("component") == "virtfleet-e2e"
    ]
    assert counts == [4]
    described = cluster.kubectl("describe", "vm", "noisy", "-n", namespace).stdout
    assert "Unschedulable" in described
    assert "no room" in described


async def test_events_about_cluster_scoped_objects_go_to_default(
    cluster: Cluster, kube: KubeClient
) -> None:
    node = await kube.get_node("node-b")
    reason = f"E2eProbe{uuid.uuid4().hex[:6]}"
    await kube.record_event(node, "Normal", reason, "hello", "virtfleet-e2e")
    out = cluster.kubectl("get", "events", "-n", "default", "-o", "json").stdout
    assert any(e["reason"] == reason for e in json.loads(out)["items"])
