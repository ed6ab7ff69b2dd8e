"""The controller and VMNetworks: status, finalizer, and placement that waits for them."""

from __future__ import annotations

from typing import Any

from tests.controller.test_controller import add_vm, host_body, make

from testkit.kube import FakeKube
from virtfleet.controller.controller import Controller
from virtfleet.controller.networks import CONFLICT_RETRY
from virtfleet.identity import NETWORK_FINALIZER

LAN = [{"name": "lan", "type": "network", "network": "lan"}]


def add_network(
    controller: Controller,
    kube: FakeKube,
    name: str = "lan",
    created: str = "2026-01-01T10:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    body = kube.put(
        "VMNetwork",
        {
            "metadata": {"name": name, "generation": 1, "creationTimestamp": created},
            "spec": {"namespaces": ["ns"], **spec},
        },
    )
    controller.networks.event(None, body)
    return body


async def settle(controller: Controller, kube: FakeKube, name: str = "lan") -> None:
    """Run the network's reconcile until it asks for nothing more, feeding the echoes back."""
    for _ in range(5):
        again = await controller.networks.reconcile(name)
        if ("", name) in kube.objects:
            controller.networks.event(None, kube.get_now("VMNetwork", None, name))
        if again is None:
            return
    raise AssertionError("the network did not settle")


def conditions(kube: FakeKube, key: tuple[str, str]) -> dict[str, tuple[str, str]]:
    raw = kube.objects[key]["status"]["conditions"]
    return {c["type"]: (c["status"], c["reason"]) for c in raw}


async def test_a_vm_waits_for_its_address_then_is_placed() -> None:
    controller, kube = make()
    add_network(controller, kube, subnet="10.20.0.0/24", gateway="10.20.0.1")
    add_vm(controller, kube, name="web", interfaces=LAN)
    await controller.reconcile(("ns", "web"))
    assert controller.cache.vms[("ns", "web")].node_name is None
    assert conditions(kube, ("ns", "web"))["Reconciling"] == ("True", "WaitingForNetwork")
    assert "Stalled" not in conditions(kube, ("ns", "web"))

    await settle(controller, kube)
    network = kube.objects[("", "lan")]
    assert network["metadata"]["finalizers"] == [NETWORK_FINALIZER]
    status = network["status"]
    assert status["vni"] == 4096
    assert status["dhcpAddress"] == "10.20.0.254"
    assert status["allocatedCount"] == 1
    assert status["addresses"] == [
        {
            "address": "10.20.0.2",
            "namespace": "ns",
            "vm": "web",
            "uid": "uid-web",
            "interface": "lan",
        }
    ]
    assert conditions(kube, ("", "lan"))["Ready"] == ("True", "VniAssigned")

    await controller.reconcile(("ns", "web"))
    assert controller.cache.vms[("ns", "web")].node_name is not None
    # Nothing changed: a second pass writes nothing.
    before = len(kube.calls)
    await settle(controller, kube)
    assert len(kube.calls) == before


async def test_a_missing_network_stalls_the_vm_until_it_appears() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="web", interfaces=LAN)
    await controller.reconcile(("ns", "web"))
    assert conditions(kube, ("ns", "web"))["Stalled"] == ("True", "NetworkNotFound")
    assert ("web", "Warning", "NetworkNotFound") in kube.events
    woken: list[tuple[str, str]] = []
    controller.networks.wake = woken.extend
    add_network(controller, kube)  # no subnet: a VNI is all the VM needs
    assert woken == [("ns", "web")]  # retried when the network appears
    await settle(controller, kube)
    await controller.reconcile(("ns", "web"))
    assert controller.cache.vms[("ns", "web")].node_name is not None


async def test_a_namespace_the_network_does_not_allow_is_not_placed() -> None:
    controller, kube = make()
    add_network(controller, kube, subnet="10.20.0.0/24")
    add_vm(controller, kube, name="intruder", namespace="other", interfaces=LAN)
    await settle(controller, kube)
    await controller.reconcile(("other", "intruder"))
    assert controller.cache.vms[("other", "intruder")].node_name is None
    assert conditions(kube, ("other", "intruder"))["Stalled"] == ("True", "NetworkNotAllowed")
    message = next(
        c["message"]
        for c in kube.objects[("other", "intruder")]["status"]["conditions"]
        if c["type"] == "Stalled"
    )
    assert "VMNetwork lan" in message
    assert "spec.namespaces" in message
    assert kube.objects[("", "lan")]["status"].get("addresses", []) == []


async def test_an_exhausted_subnet_stalls_the_newest_vm() -> None:
    controller, kube = make()
    add_network(controller, kube, subnet="10.20.0.0/29", gateway="10.20.0.1")
    for i in range(5):
        body = add_vm(controller, kube, name=f"vm{i}", interfaces=LAN)
        body["metadata"]["creationTimestamp"] = f"2026-01-01T11:00:0{i}Z"
        controller.vm_event(None, kube.put(body))
    await settle(controller, kube)
    assert kube.objects[("", "lan")]["status"]["allocatedCount"] == 4
    await controller.reconcile(("ns", "vm4"))
    assert conditions(kube, ("ns", "vm4"))["Stalled"] == ("True", "AddressesExhausted")
    # vm0 goes: its address is free for vm4.
    controller.vm_event("DELETED", kube.objects[("ns", "vm0")])
    await settle(controller, kube)
    held = {a["vm"]: a["address"] for a in kube.objects[("", "lan")]["status"]["addresses"]}
    assert held["vm4"] == "10.20.0.2"
    await controller.reconcile(("ns", "vm4"))
    assert controller.cache.vms[("ns", "vm4")].node_name is not None


async def test_a_duplicate_vni_makes_the_newer_network_not_ready() -> None:
    controller, kube = make()
    add_network(controller, kube, "old", created="2026-01-01T10:00:00Z", vni=7)
    add_network(controller, kube, "new", created="2026-01-01T10:00:01Z", vni=7,
                namespaces=["*"])  # fmt: skip
    await settle(controller, kube, "old")
    await settle(controller, kube, "new")
    assert kube.objects[("", "old")]["status"]["vni"] == 7
    assert "vni" not in kube.objects[("", "new")]["status"]
    assert conditions(kube, ("", "new"))["Ready"] == ("False", "VniConflict")
    add_vm(controller, kube, name="web", interfaces=[{**LAN[0], "network": "new"}])
    await controller.reconcile(("ns", "web"))
    assert conditions(kube, ("ns", "web"))["Stalled"] == ("True", "NetworkNotReady")


async def test_a_deleted_network_stays_while_a_vm_names_it() -> None:
    controller, kube = make()
    add_network(controller, kube, subnet="10.20.0.0/24")
    add_vm(controller, kube, name="web", interfaces=LAN)
    await settle(controller, kube)
    await kube.delete("VMNetwork", None, "lan")
    controller.networks.event(None, kube.get_now("VMNetwork", None, "lan"))
    await settle(controller, kube)
    stored = kube.objects[("", "lan")]
    assert stored["metadata"]["finalizers"] == [NETWORK_FINALIZER]
    assert stored["status"]["addresses"][0]["vm"] == "web"
    assert conditions(kube, ("", "lan"))["Reconciling"] == ("True", "WaitingForDetach")
    # A newcomer is not placed on a network being deleted.
    add_vm(controller, kube, name="late", interfaces=LAN)
    await controller.reconcile(("ns", "late"))
    assert conditions(kube, ("ns", "late"))["Stalled"] == ("True", "NetworkNotFound")
    for name in ("web", "late"):
        controller.vm_event("DELETED", kube.objects[("ns", name)])
    await settle(controller, kube)
    assert ("", "lan") not in kube.objects  # the finalizer went, and so did the network


async def test_status_writes_are_compare_and_swap() -> None:
    controller, kube = make()
    add_network(controller, kube, subnet="10.20.0.0/24")
    await settle(controller, kube)
    add_vm(controller, kube, name="web", interfaces=LAN)
    kube.objects[("", "lan")]["metadata"]["resourceVersion"] = "999"  # someone wrote meanwhile
    assert await controller.networks.reconcile("lan") == CONFLICT_RETRY
    controller.networks.event(None, kube.get_now("VMNetwork", None, "lan"))
    assert await controller.networks.reconcile("lan") is None
    assert kube.objects[("", "lan")]["status"]["allocatedCount"] == 1


async def test_only_nodes_that_realise_networks_take_a_vm_with_one() -> None:
    controller, kube = make()
    controller.host_event(None, host_body("node-a", tunnel=None))  # --tunnel-address unset
    add_network(controller, kube)
    add_vm(controller, kube, name="web", interfaces=LAN)
    await controller.reconcile(("ns", "web"))
    await settle(controller, kube)
    await controller.reconcile(("ns", "web"))
    assert controller.cache.vms[("ns", "web")].node_name == "node-b"


async def test_addresses_wait_for_every_vm_to_be_known() -> None:
    """A restarted controller lists the VMs before it allocates: an address held by a VM
    its watch has not delivered yet is not released (and handed to another)."""
    controller, kube = make()
    add_network(controller, kube, subnet="10.20.0.0/24")
    old = kube.put("VirtualMachine", {
        "metadata": {"namespace": "ns", "name": "old", "uid": "uid-old",
                     "creationTimestamp": "2026-01-01T09:00:00Z"},
        "spec": {"memory": {"size": "64Mi"}, "interfaces": LAN},
    })  # fmt: skip
    kube.objects[("", "lan")]["status"] = {
        "vni": 4096,
        "addresses": [
            {"address": "10.20.0.7", "namespace": "ns", "vm": "old", "uid": "uid-old",
             "interface": "lan"},
        ],
    }  # fmt: skip
    controller.networks.event(None, kube.get_now("VMNetwork", None, "lan"))
    await controller.networks.prime()
    assert controller.networks.primed.is_set()
    await settle(controller, kube)
    assert kube.objects[("", "lan")]["status"]["addresses"][0]["address"] == "10.20.0.7"
    assert old["metadata"]["uid"] == "uid-old"
