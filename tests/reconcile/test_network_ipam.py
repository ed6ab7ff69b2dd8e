"""VMNetwork bookkeeping: VNIs, stable addresses, refusals, and what holds a VM back."""

from __future__ import annotations

from typing import Any

import pytest

from virtfleet.api.network import NetworkAddress, VMNetworkSpec
from virtfleet.reconcile.network_ipam import (
    FIRST_AUTO_VNI,
    Allocation,
    Attachment,
    NetworkState,
    NetworkVni,
    allocate,
    assign_vnis,
    attachment_hold,
    network_status,
    reserved_addresses,
    spec_problem,
)


def net(**fields: Any) -> VMNetworkSpec:
    return VMNetworkSpec.model_validate({"namespaces": ["shop"], **fields})


def nic(vm: str, interface: str = "lan", namespace: str = "shop", created: str = "") -> Attachment:
    return Attachment(
        created=created or f"2026-01-01T00:00:0{len(vm) % 10}Z",
        namespace=namespace,
        vm=vm,
        uid=f"uid-{vm}",
        interface=interface,
    )


def by_vm(result: Allocation) -> dict[str, str]:
    return {f"{a.vm}/{a.interface}": a.address for a in result.addresses}


# --- VNIs ------------------------------------------------------------------------------


def vni_view(name: str, created: str, spec: int | None = None, status: int | None = None) -> Any:
    return NetworkVni(name=name, created=created, spec_vni=spec, status_vni=status)


def test_vnis_are_assigned_from_4096_and_kept() -> None:
    first = assign_vnis([vni_view("a", "1"), vni_view("b", "2")])
    assert first.vnis == {"a": FIRST_AUTO_VNI, "b": FIRST_AUTO_VNI + 1}
    # Once written, a network keeps its VNI even when an older one appears without one.
    again = assign_vnis(
        [vni_view("a", "1", status=4096), vni_view("b", "2", status=4097), vni_view("z", "0")]
    )
    assert again.vnis == {"a": 4096, "b": 4097, "z": 4098}
    assert not again.conflicts


def test_a_pinned_vni_wins_and_the_newer_duplicate_is_refused() -> None:
    result = assign_vnis(
        [vni_view("new", "2026-01-02", spec=100), vni_view("old", "2026-01-01", spec=100)]
    )
    assert result.vnis == {"old": 100}
    assert "old" in result.conflicts["new"]
    # The older one goes: the newer gets its pin.
    assert assign_vnis([vni_view("new", "2026-01-02", spec=100)]).vnis == {"new": 100}


def test_a_vni_in_use_never_moves() -> None:
    """Its VMs are plugged into its bridge on every node: the pin waits instead."""
    result = assign_vnis([vni_view("auto", "1", status=4096), vni_view("pinned", "2", spec=4096)])
    assert result.vnis == {"auto": 4096}
    assert "already used by VMNetwork auto" in result.conflicts["pinned"]


def test_a_pin_set_later_cannot_change_the_vni_in_use() -> None:
    result = assign_vnis([vni_view("live", "1", spec=5000, status=4096)])
    assert result.vnis == {"live": 4096}  # kept: its VMs run on it
    assert "cannot change" in result.conflicts["live"]
    same = assign_vnis([vni_view("live", "1", spec=4096, status=4096)])
    assert (same.vnis, same.conflicts) == ({"live": 4096}, {})


# --- addresses ---------------------------------------------------------------------------


def test_addresses_skip_network_gateway_dhcp_and_broadcast() -> None:
    spec = net(subnet="10.20.0.0/29", gateway="10.20.0.1")
    vms = [nic(f"vm{i}", created=f"2026-01-01T00:00:0{i}Z") for i in range(5)]
    result = allocate("lan", spec, [], vms)
    assert by_vm(result) == {
        "vm0/lan": "10.20.0.2",
        "vm1/lan": "10.20.0.3",
        "vm2/lan": "10.20.0.4",
        "vm3/lan": "10.20.0.5",
    }
    assert result.dhcp_address == "10.20.0.6"
    # /29: 8 addresses - network, broadcast, gateway, DHCP = 4 for VMs; the newest waits.
    (refusal,) = result.refused.values()
    assert refusal.reason == "AddressesExhausted"
    assert result.refused == {("uid-vm4", "lan"): refusal}


def test_the_dhcp_address_steps_aside_for_a_gateway_at_the_top() -> None:
    reserved = reserved_addresses(net(subnet="10.20.0.0/24", gateway="10.20.0.254"))
    assert reserved is not None
    assert str(reserved.dhcp) == "10.20.0.253"
    assert allocate("lan", net(subnet="10.20.0.0/24", dhcp=False), [], []).dhcp_address is None


def test_allocations_are_stable_and_released_with_their_vm() -> None:
    spec = net(subnet="10.20.0.0/24")
    a, b, c = nic("a", created="1"), nic("b", created="2"), nic("c", created="3")
    first = allocate("lan", spec, [], [a, b, c])
    assert by_vm(first) == {"a/lan": "10.20.0.1", "b/lan": "10.20.0.2", "c/lan": "10.20.0.3"}
    # The same call again changes nothing (a restart, a migration: the uid stays).
    assert allocate("lan", spec, first.addresses, [c, b, a]) == first
    # b is deleted: its address is free; a newcomer gets the lowest free one, a and c keep.
    d = nic("d", created="4")
    after = allocate("lan", spec, first.addresses, [a, c, d])
    assert by_vm(after) == {"a/lan": "10.20.0.1", "d/lan": "10.20.0.2", "c/lan": "10.20.0.3"}


def test_a_recreated_vm_is_a_new_holder() -> None:
    spec = net(subnet="10.20.0.0/24")
    old = allocate("lan", spec, [], [nic("a")])
    reborn = Attachment(created="9", namespace="shop", vm="a", uid="uid-new", interface="lan")
    result = allocate("lan", spec, old.addresses, [reborn])
    assert [(r.uid, r.address) for r in result.addresses] == [("uid-new", "10.20.0.1")]


def test_every_interface_gets_its_own_address() -> None:
    result = allocate("lan", net(subnet="10.20.0.0/24"), [], [nic("a", "x"), nic("a", "y")])
    assert by_vm(result) == {"a/x": "10.20.0.1", "a/y": "10.20.0.2"}


def test_an_address_the_gateway_moved_onto_is_given_again() -> None:
    held = [NetworkAddress(address="10.20.0.1", namespace="shop", vm="a", uid="uid-a",
                           interface="lan")]  # fmt: skip
    result = allocate("lan", net(subnet="10.20.0.0/24", gateway="10.20.0.1"), held, [nic("a")])
    assert by_vm(result) == {"a/lan": "10.20.0.2"}


def test_namespaces_not_allowed_are_refused_even_without_a_subnet() -> None:
    for spec in (net(), net(subnet="10.20.0.0/24")):
        result = allocate("lan", spec, [], [nic("a"), nic("b", namespace="other")])
        assert [r.vm for r in result.addresses] == (["a"] if spec.subnet else [])
        refusal = result.refused[("uid-b", "lan")]
        assert refusal.reason == "NetworkNotAllowed"
        assert "lan" in refusal.message
        assert "spec.namespaces" in refusal.message
    assert not allocate("lan", net(namespaces=["*"]), [], [nic("b", namespace="x")]).refused


def test_a_held_address_survives_its_namespace_being_removed() -> None:
    spec = net(namespaces=["shop", "other"], subnet="10.20.0.0/24")
    held = allocate("lan", spec, [], [nic("b", namespace="other")]).addresses
    narrowed = net(subnet="10.20.0.0/24")
    result = allocate("lan", narrowed, held, [nic("b", namespace="other")])
    assert by_vm(result) == {"b/lan": "10.20.0.1"}


def test_a_deleting_vm_keeps_its_address_but_gets_none() -> None:
    spec = net(subnet="10.20.0.0/24")
    held = allocate("lan", spec, [], [nic("a")]).addresses
    leaving = Attachment(created="1", namespace="shop", vm="a", uid="uid-a", interface="lan",
                         deleting=True)  # fmt: skip
    assert allocate("lan", spec, held, [leaving]).addresses == held
    fresh = Attachment(created="1", namespace="shop", vm="n", uid="uid-n", interface="lan",
                       deleting=True)  # fmt: skip
    assert allocate("lan", spec, [], [fresh]).addresses == ()


def test_a_gateway_on_the_broadcast_address_is_a_problem() -> None:
    assert spec_problem(net(subnet="10.20.0.0/24", gateway="10.20.0.255")) is not None
    assert spec_problem(net(subnet="10.20.0.0/24", gateway="10.20.0.1")) is None


# --- placement holds ----------------------------------------------------------------------


def state(spec: VMNetworkSpec | None = None, **fields: Any) -> NetworkState:
    values: dict[str, Any] = {
        "spec": spec or net(subnet="10.20.0.0/24"),
        "vni": 4096,
        "deleting": False,
        "not_ready": None,
        "addresses": {("uid-a", "lan"): "10.20.0.1"},
        "refused": {},
    }
    values.update(fields)
    return NetworkState(**values)


@pytest.mark.parametrize(
    ("network", "attachment", "reason", "stalled"),
    [
        (None, nic("a"), "NetworkNotFound", True),
        (state(deleting=True), nic("a"), "NetworkNotFound", True),
        (state(not_ready="spec.vni 7 is already used"), nic("a"), "NetworkNotReady", True),
        (state(), nic("a", namespace="other"), "NetworkNotAllowed", True),
        (state(vni=None), nic("a"), "WaitingForNetwork", False),
        (state(), nic("b"), "WaitingForNetwork", False),
        (state(spec=net()), nic("b"), None, False),  # no subnet: a VNI is all it needs
        (state(), nic("a"), None, False),
    ],
)
def test_attachment_holds(
    network: NetworkState | None, attachment: Attachment, reason: str | None, stalled: bool
) -> None:
    hold = attachment_hold("lan", network, attachment)
    if reason is None:
        assert hold is None
    else:
        assert hold is not None
        assert (hold.reason, hold.stalled) == (reason, stalled)
        assert "VMNetwork lan" in hold.message


def test_an_exhausted_network_stalls_the_vm_without_an_address() -> None:
    refusal = allocate("lan", net(subnet="10.20.0.0/29"), [], [nic(f"v{i}") for i in range(6)])
    assert refusal.refused
    ((key, _),) = refusal.refused.items()
    waiting = Attachment(created="", namespace="shop", vm="x", uid=key[0], interface=key[1])
    hold = attachment_hold("lan", state(refused=refusal.refused, addresses={}), waiting)
    assert hold is not None
    assert (hold.reason, hold.stalled) == ("AddressesExhausted", True)


# --- status ------------------------------------------------------------------------------


def test_status_ready_conflict_and_deletion() -> None:
    allocation = allocate("lan", net(subnet="10.20.0.0/24"), [], [nic("a")])
    ready = network_status({}, 2, vni=4096, problem=None, allocation=allocation, deleting=False,
                           now="2026-01-01T00:00:00Z")  # fmt: skip
    assert ready["vni"] == 4096
    assert ready["allocatedCount"] == 1
    assert ready["dhcpAddress"] == "10.20.0.254"
    assert ready["observedGeneration"] == 2
    assert [(c["type"], c["status"]) for c in ready["conditions"]] == [("Ready", "True")]
    # Same inputs later: the same status (nothing to write).
    assert network_status(ready, 2, vni=4096, problem=None, allocation=allocation,
                          deleting=False, now="2026-01-02T00:00:00Z") == ready  # fmt: skip
    conflict = network_status(ready, 2, vni=None, problem=("VniConflict", "taken"),
                              allocation=Allocation(), deleting=False)  # fmt: skip
    assert "vni" not in conflict
    conditions = {c["type"]: (c["status"], c["reason"]) for c in conflict["conditions"]}
    assert conditions == {"Ready": ("False", "VniConflict"), "Stalled": ("True", "VniConflict")}
    leaving = network_status(ready, 2, vni=4096, problem=None, allocation=allocation,
                             deleting=True)  # fmt: skip
    conditions = {c["type"]: (c["status"], c["reason"]) for c in leaving["conditions"]}
    assert conditions["Reconciling"] == ("True", "WaitingForDetach")
