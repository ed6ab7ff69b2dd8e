"""The orphan sweep on a test-driver node: what it removes, and what it never touches."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from testkit.kube import FakeKube
from virtfleet.agent.host import sweep_orphans
from virtfleet.hypervisor import Hypervisor, storage
from virtfleet.identity import NODE_LABEL
from virtfleet.logs import get_logger

NODE = "node-a"
LOCAL_POOL = "virtfleet-local"


def fake_kube(vms: list[dict[str, Any]], migrations: list[dict[str, Any]]) -> FakeKube:
    """The two reads the sweep makes, over fixed VMs and VMMigrations."""
    return FakeKube(objects={"VirtualMachine": vms, "VMMigration": migrations})


def vm(name: str, uid: str, node: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": "ns", "uid": uid, "labels": {NODE_LABEL: node}}
    return {"metadata": meta, "status": {"nodeName": node}}


def migration(vm_name: str, phase: str) -> dict[str, Any]:
    meta = {"name": f"mig-{vm_name}", "namespace": "ns"}
    return {"metadata": meta, "spec": {"vmName": vm_name}, "status": {"phase": phase}}


def agent(hv: Hypervisor, kube: FakeKube, cache: dict[Any, Any] | None = None) -> Any:
    settings = SimpleNamespace(node_name=NODE, pools=[LOCAL_POOL], shared_pools=[])
    cache = {} if cache is None else cache
    return SimpleNamespace(
        hv=hv,
        kube=kube,
        settings=settings,
        log=get_logger("test"),
        cache=cache,
        forget=lambda key: cache.pop(key, None),
    )


UIDS = {
    name: f"00000000-0000-4000-8000-{n:012d}"
    for n, name in enumerate(["here", "gone", "moved", "moved-running", "migrating"], start=1)
}


async def test_sweep_removes_what_no_vm_wants_and_keeps_the_rest(
    hv: Hypervisor, domain_xml: Callable[..., str]
) -> None:
    for name, uid in UIDS.items():
        guest = await hv.define(domain_xml(f"ns_{name}", uid, namespace="ns", vm_name=name))
        if name in ("here", "moved-running"):  # "migrating": defined, not started (offline)
            await guest.start()
        await storage.create_blank(hv, LOCAL_POOL, f"{uid}-root", 2**20, fmt="raw")
    kube = fake_kube(
        vms=[
            vm("here", UIDS["here"], NODE),
            vm("moved", UIDS["moved"], "node-b"),
            vm("moved-running", UIDS["moved-running"], "node-b"),
            vm("migrating", UIDS["migrating"], "node-b"),
        ],
        migrations=[migration("migrating", "Running"), migration("moved", "Succeeded")],
    )
    removed = await sweep_orphans(agent(hv, kube))

    assert sorted(removed) == [
        "domain/ns_gone",
        "domain/ns_moved",
        f"volume/{LOCAL_POOL}/{UIDS['gone']}-root",
        f"volume/{LOCAL_POOL}/{UIDS['moved']}-root",
    ]
    left = sorted(item.guest.name for item in await hv.list_owned())
    assert left == ["ns_here", "ns_migrating", "ns_moved-running"]
    volumes = sorted(v.name for v in await storage.list_volumes(hv, LOCAL_POOL))
    assert volumes == [f"{UIDS[n]}-root" for n in ("here", "moved-running", "migrating")]


async def test_a_vm_deleted_while_the_watch_was_away_is_forgotten(hv: Hypervisor) -> None:
    # kopf's new listing after a broken watch says nothing about what vanished meanwhile.
    cache = {
        ("ns", "here"): vm("here", UIDS["here"], NODE),
        ("ns", "gone"): vm("gone", UIDS["gone"], NODE),
    }
    await sweep_orphans(agent(hv, fake_kube([vm("here", UIDS["here"], NODE)], []), cache))
    assert list(cache) == [("ns", "here")]


class ListingKube(FakeKube):
    """Records the label selector of every VM listing."""

    def __init__(self, vms: list[dict[str, Any]]) -> None:
        super().__init__(objects={"VirtualMachine": vms, "VMMigration": []})
        self.vm_listings: list[str | None] = []

    async def list(self, kind: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if kind == "VirtualMachine":
            self.vm_listings.append(kwargs.get("label_selector"))
        return await super().list(kind, *args, **kwargs)


async def test_at_steady_state_the_sweep_lists_this_nodes_vms_only(
    hv: Hypervisor, domain_xml: Callable[..., str]
) -> None:
    # O(this node), not O(fleet): 20 agents listing 10,000 VMs every resync is the cost
    # of issue #21. Other nodes' VMs are only listed when something here is unexplained.
    uid = UIDS["here"]
    await (await hv.define(domain_xml("ns_here", uid, namespace="ns", vm_name="here"))).start()
    await storage.create_blank(hv, LOCAL_POOL, f"{uid}-root", 2**20, fmt="raw")
    kube = ListingKube([vm("here", uid, NODE), vm("elsewhere", UIDS["moved"], "node-b")])
    assert await sweep_orphans(agent(hv, kube)) == []
    assert kube.vm_listings == [f"{NODE_LABEL}={NODE}"]

    # A disk of a VM that is not this node's (it moved away): now every VM is listed.
    await storage.create_blank(hv, LOCAL_POOL, f"{UIDS['moved']}-root", 2**20, fmt="raw")
    kube.vm_listings.clear()
    assert await sweep_orphans(agent(hv, kube)) == [f"volume/{LOCAL_POOL}/{UIDS['moved']}-root"]
    assert kube.vm_listings == [f"{NODE_LABEL}={NODE}", None]
