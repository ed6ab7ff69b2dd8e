"""The tests' in-memory API (testkit.kube) keeps the apiserver's rules the operators rely on,
and it and the real client both implement the whole :class:`KubeApi` protocol."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from testkit.kube import FakeKube
from virtfleet.runtime.kube import KubeClient
from virtfleet.runtime.kubeapi import Conflict, KubeApi, NotFound

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def vm(name: str = "a", **meta: object) -> dict[str, object]:
    return {
        "metadata": {"namespace": "ns", "name": name, **meta},
        "spec": {"memory": {"size": "1Gi"}},
    }


def parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults (mypy checks the types)."""
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_both_implement_every_member_of_the_protocol_with_its_parameters() -> None:
    members = [
        name
        for name, value in vars(KubeApi).items()
        if inspect.isfunction(value) and not name.startswith("_")
    ]
    assert {"get", "list", "patch", "patch_status", "record_event"} <= set(members)
    for implementation in (KubeClient, FakeKube):
        for name in members:
            wanted = parameters(getattr(KubeApi, name))
            assert parameters(getattr(implementation, name)) == wanted, implementation


async def test_writes_bump_the_resource_version_and_a_stale_one_conflicts() -> None:
    kube: KubeApi = FakeKube(clock=lambda: NOW)
    created = await kube.create("VirtualMachine", vm())
    rv = created["metadata"]["resourceVersion"]
    assert created["metadata"]["creationTimestamp"] == "2026-01-01T12:00:00Z"
    assert (created["kind"], created["apiVersion"]) == ("VirtualMachine", "virtfleet.io/v1alpha1")
    with pytest.raises(Conflict):
        await kube.create("VirtualMachine", vm())

    patched = await kube.patch_metadata(
        "VirtualMachine", "ns", "a", labels={"x": "1"}, resource_version=rv
    )
    assert patched["metadata"]["resourceVersion"] != rv
    with pytest.raises(Conflict):
        await kube.patch_status("VirtualMachine", "ns", "a", {"phase": "x"}, resource_version=rv)
    with pytest.raises(Conflict):
        await kube.patch("VirtualMachine", "ns", "a", {"metadata": {"resourceVersion": rv}})
    assert (await kube.get("VirtualMachine", "ns", "a"))["metadata"]["labels"] == {"x": "1"}


async def test_missing_objects_are_not_found() -> None:
    kube = FakeKube()
    with pytest.raises(NotFound):
        await kube.get("VirtualMachine", "ns", "a")
    with pytest.raises(NotFound):
        await kube.patch_status("VirtualMachine", "ns", "a", {})
    with pytest.raises(NotFound):
        await kube.delete("VMSnapshot", "ns", "a")
    with pytest.raises(NotFound):
        await kube.get_secret_key("ns", "a", "key")


async def test_merge_patches_and_the_status_subresource() -> None:
    kube = FakeKube()
    kube.put("VirtualMachine", {**vm(), "status": {"a": 1, "b": {"c": 2}}})
    body = await kube.patch_status("VirtualMachine", "ns", "a", {"a": None, "b": {"d": 3}})
    assert body["status"] == {"b": {"c": 2, "d": 3}}
    # A status in a patch of the object itself is ignored, as the apiserver does.
    body = await kube.patch("VirtualMachine", "ns", "a", {"status": {"a": 9}, "spec": {"x": 1}})
    assert body["status"] == {"b": {"c": 2, "d": 3}}
    assert body["spec"] == {"memory": {"size": "1Gi"}, "x": 1}
    assert body["metadata"]["generation"] == 1  # the spec changed (put gave it none)
    assert [c[0] for c in kube.calls] == ["status", "patch"]


async def test_finalizers_hold_a_deletion_until_the_last_one_goes() -> None:
    kube = FakeKube()
    kube.put("VMSnapshot", vm("s", finalizers=["f"]))
    await kube.delete("VMSnapshot", "ns", "s")
    held = kube.get_now("VMSnapshot", "ns", "s")
    assert held["metadata"]["deletionTimestamp"]
    await kube.patch("VMSnapshot", "ns", "s", {"metadata": {"finalizers": None}})
    assert ("VMSnapshot", "ns", "s") not in kube.objects
    kube.put("VMSnapshot", vm("t"))
    await kube.delete("VMSnapshot", "ns", "t")
    assert kube.objects == {}


async def test_lists_select_by_kind_namespace_and_labels() -> None:
    kube = FakeKube(keyed_by_name=True)
    kube.put("VirtualMachine", vm("a", labels={"tier": "web"}))
    kube.put("VirtualMachine", {**vm("b"), "metadata": {"namespace": "other", "name": "b"}})
    kube.put("VMSnapshot", vm("s"))
    assert set(kube.objects) == {("ns", "a"), ("other", "b"), ("ns", "s")}

    def names(items: list[dict[str, object]]) -> list[object]:
        return sorted(i["metadata"]["name"] for i in items)  # type: ignore[index]

    assert names(await kube.list("VirtualMachine")) == ["a", "b"]
    assert names(await kube.list("VirtualMachine", "ns")) == ["a"]
    assert names(await kube.list("VirtualMachine", label_selector="tier=web")) == ["a"]
    assert names(await kube.list("VirtualMachine", label_selector="!tier")) == ["b"]
    assert names(await kube.list("VMSnapshot", field_selector="metadata.name=s")) == ["s"]


async def test_vmhost_upsert_secrets_and_events() -> None:
    kube = FakeKube(event_fields=("name", "type", "reason"))
    await kube.upsert_vmhost_status("node-a", {"ready": True})
    await kube.upsert_vmhost_status("node-a", {"memory": 1})
    assert kube.get_now("VMHost", None, "node-a")["status"] == {"ready": True, "memory": 1}
    kube.put("Secret", {"metadata": {"namespace": "ns", "name": "s"}, "data": {"k": "aGk="}})
    assert await kube.get_secret_key("ns", "s", "k") == b"hi"
    await kube.record_event(vm(), "Warning", "Oops", "it broke", "test")
    await kube.record_event({"kind": "Node", "name": "node-a"}, "Normal", "Hi", "hello", "test")
    assert kube.events == [("a", "Warning", "Oops"), ("node-a", "Normal", "Hi")]
    assert kube.recorded[0].message == "it broke"
