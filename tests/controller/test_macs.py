"""MACs across a fleet: derived ones do not collide, explicit ones cannot be copied."""

from __future__ import annotations

import uuid

from tests.controller.fleet_builders import vm_body
from tests.controller.test_controller import add_vm, make

from virtfleet.controller.macs import MacIndex
from virtfleet.identity import derive_mac, is_derived_range
from virtfleet.reconcile.views import CachedVm

MAC = "02:00:00:aa:bb:01"


def test_a_large_fleet_of_derived_macs_has_no_duplicate() -> None:
    """24 derived bits gave ~300 duplicates among 100,000 NICs; 44 bits give none here."""
    macs = {derive_mac(str(uuid.uuid5(uuid.NAMESPACE_URL, str(i))), "nic0") for i in range(100_000)}
    assert len(macs) == 100_000
    assert all(is_derived_range(m) and int(m[:2], 16) & 0x03 == 0x02 for m in macs)


def test_explicit_macs_outside_the_derived_range_are_not_derived() -> None:
    assert not is_derived_range(MAC)
    assert is_derived_range("fe:00:00:00:00:01")


def _view(name: str, namespace: str = "ns", created: str = "2026-01-01T12:00:00Z",
          node: str | None = None) -> CachedVm:  # fmt: skip
    body = vm_body(name, namespace=namespace, interfaces=[{"name": "nic0", "macAddress": MAC}])
    body["metadata"]["creationTimestamp"] = created
    if node:
        body["status"] = {"nodeName": node}
    return CachedVm.from_body(body)


def test_the_older_vm_keeps_the_mac_and_the_newer_is_told() -> None:
    old, new = _view("old"), _view("new", created="2026-01-01T12:00:01Z")
    index = MacIndex()
    vms = {old.key: old, new.key: new}
    for vm in vms.values():
        index.update(vm.key, [MAC])
    assert index.conflict(old, vms) is None
    message = index.conflict(new, vms)
    assert message is not None
    assert "VM old" in message
    assert MAC in message


def test_a_placed_vm_keeps_its_mac_against_an_older_newcomer() -> None:
    placed = _view("placed", created="2026-01-01T12:00:05Z", node="node-a")
    waiting = _view("waiting")
    vms = {placed.key: placed, waiting.key: waiting}
    index = MacIndex()
    for vm in vms.values():
        index.update(vm.key, [MAC])
    assert index.conflict(waiting, vms) is not None


def test_another_namespace_is_not_named() -> None:
    mine, theirs = _view("mine", created="2026-01-01T12:00:01Z"), _view("theirs", "other")
    vms = {mine.key: mine, theirs.key: theirs}
    index = MacIndex()
    for vm in vms.values():
        index.update(vm.key, [MAC])
    message = index.conflict(mine, vms)
    assert message is not None
    assert "another VM" in message
    assert "theirs" not in message


def test_removal_frees_the_mac() -> None:
    index = MacIndex()
    index.update(("ns", "a"), [MAC])
    index.remove(("ns", "a"))
    assert len(index) == 0


async def test_the_controller_does_not_place_a_copied_mac() -> None:
    controller, kube = make()
    nic = [{"name": "nic0", "macAddress": MAC}]
    first = add_vm(controller, kube, name="first", interfaces=nic)
    first["metadata"]["creationTimestamp"] = "2026-01-01T11:00:00Z"
    controller.vm_event(None, kube.put(first))
    await controller.reconcile(("ns", "first"))
    copy_ = add_vm(controller, kube, name="copy", interfaces=nic)
    copy_["metadata"]["creationTimestamp"] = "2026-01-01T11:30:00Z"
    controller.vm_event(None, kube.put(copy_))
    await controller.reconcile(("ns", "copy"))
    assert controller.cache.vms[("ns", "first")].node_name is not None
    assert controller.cache.vms[("ns", "copy")].node_name is None
    conditions = kube.objects[("ns", "copy")]["status"]["conditions"]
    stalled = [c for c in conditions if c["type"] == "Stalled"]
    assert stalled
    assert stalled[0]["reason"] == "MacAddressConflict"
    assert ("copy", "Warning", "MacAddressConflict") in kube.events
    # Deleting the first VM frees the MAC for the copy.
    controller.vm_event("DELETED", kube.objects[("ns", "first")])
    await controller.reconcile(("ns", "copy"))
    assert controller.cache.vms[("ns", "copy")].node_name is not None
