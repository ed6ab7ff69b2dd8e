"""The controller cache's indexes agree with a scan of the fleet, whatever happens to VMs.

Placement reads ``allocated()``, node events ``placed_on()``, retries ``unplaced()``: at
10,000 VMs each was a scan of every VM per call (issue #21); now they are kept as VMs
change, and this checks them against the scan they replace.
"""

from __future__ import annotations

import random
from typing import Any

from virtfleet.controller.cache import FleetCache
from virtfleet.identity import Key

NODES = ["node-a", "node-b", "node-c", None]


def body(name: str, rv: int, node: str | None, memory_mib: int, deleting: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "namespace": "ns",
        "name": name,
        "uid": name,
        "resourceVersion": str(rv),
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    status = {"nodeName": node} if node else {}
    return {"metadata": meta, "spec": {"memory": {"size": f"{memory_mib}Mi"}}, "status": status}


def scanned(cache: FleetCache) -> tuple[dict[str, int], dict[str, set[Key]], set[Key]]:
    allocated: dict[str, int] = {}
    placed: dict[str, set[Key]] = {}
    unplaced: set[Key] = set()
    for vm in cache.vms.values():
        if vm.node_name is None:
            if not vm.deleting:
                unplaced.add(vm.key)
            continue
        allocated[vm.node_name] = allocated.get(vm.node_name, 0) + vm.memory_bytes
        placed.setdefault(vm.node_name, set()).add(vm.key)
    return allocated, placed, unplaced


def test_the_indexes_match_a_scan_through_any_sequence_of_changes() -> None:
    rng = random.Random(21)
    cache = FleetCache()
    for version in range(1, 3001):
        name = f"vm-{rng.randrange(40)}"
        if rng.random() < 0.15:
            cache.remove_vm(("ns", name))
        else:
            node = rng.choice(NODES)
            cache.upsert_vm(body(name, version, node, rng.choice([16, 64]), rng.random() < 0.1))
        allocated, placed, unplaced = scanned(cache)
        assert cache.allocated() == allocated
        for node in ("node-a", "node-b", "node-c"):
            assert {vm.key for vm in cache.placed_on(node)} == placed.get(node, set())
        assert {vm.key for vm in cache.unplaced()} == unplaced
        assert sorted(cache.nodes_with_vms()) == sorted(placed)


def test_an_older_copy_changes_no_index() -> None:
    cache = FleetCache()
    cache.upsert_vm(body("web", 5, "node-a", 64, False))
    assert cache.upsert_vm(body("web", 4, "node-b", 64, False)) is None
    assert cache.allocated() == {"node-a": 64 * 2**20}
    assert [vm.name for vm in cache.placed_on("node-b")] == []


def test_the_cache_keeps_no_managed_fields() -> None:
    cache = FleetCache()
    vm = body("web", 1, "node-a", 64, False)
    vm["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    cached = cache.upsert_vm(vm)
    assert cached is not None
    assert "managedFields" not in cached.body["metadata"]


def test_a_reserved_placement_counts_until_released_or_confirmed() -> None:
    cache = FleetCache()
    original = cache.upsert_vm(body("web", 1, None, 64, False))
    assert original is not None
    reserved = cache.reserve(original, {"nodeName": "node-a"})
    assert cache.allocated() == {"node-a": 64 * 2**20}
    assert [vm.key for vm in cache.unplaced()] == []
    cache.release(reserved, original)  # the write failed
    assert cache.allocated() == {}
    assert [vm.key for vm in cache.unplaced()] == [("ns", "web")]

    reserved = cache.reserve(original, {"nodeName": "node-a"})
    cache.upsert_vm(body("web", 2, "node-a", 64, False))  # the write's answer
    cache.release(reserved, original)  # too late: the confirmed view stays
    assert cache.allocated() == {"node-a": 64 * 2**20}
    assert scanned(cache)[0] == cache.allocated()
