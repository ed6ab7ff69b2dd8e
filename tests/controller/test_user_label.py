"""A user's ``virtfleet.io/node`` label neither places a VM nor counts its memory on a node.

Placement and capacity are ``status.nodeName`` (the controller's decision); the label only
follows it. A VM labelled by hand that the controller cannot place stays Scheduling, and
its memory is free for the VMs the controller does place there.
"""

from __future__ import annotations

from tests.controller.fleet_builders import GI
from tests.controller.test_controller import add_vm, make

from virtfleet.identity import NODE_LABEL


async def test_a_labelled_unschedulable_vm_takes_no_memory_on_the_labelled_node() -> None:
    controller, kube = make()  # node-a and node-b, 8Gi each
    add_vm(
        controller, kube, name="squatter", memory="8Gi", labels={NODE_LABEL: "node-a"},
        nodeSelector={"zone": "nowhere"},
    )  # fmt: skip
    await controller.reconcile(("ns", "squatter"))
    squatter = controller.cache.vms[("ns", "squatter")]
    assert squatter.node_name is None
    assert squatter.status["printableStatus"] == "Scheduling"
    assert controller.cache.allocated() == {}

    add_vm(controller, kube, name="tenant", memory="8Gi", nodeName="node-a")
    await controller.reconcile(("ns", "tenant"))
    assert controller.cache.vms[("ns", "tenant")].node_name == "node-a"
    assert controller.cache.allocated() == {"node-a": 8 * GI}


async def test_a_labelled_vm_is_placed_where_the_controller_decides() -> None:
    controller, kube = make()
    add_vm(controller, kube, name="pinned", memory="1Gi", nodeName="node-b",
           labels={NODE_LABEL: "node-a"})  # fmt: skip
    await controller.reconcile(("ns", "pinned"))
    placed = controller.cache.vms[("ns", "pinned")]
    assert (placed.node_name, placed.node_label) == ("node-b", "node-b")
    assert controller.cache.allocated() == {"node-b": 1 * GI}
