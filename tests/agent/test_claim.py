"""A label does not place a VM: the agent waits for the controller's ``status.nodeName``.

A tenant who could set ``virtfleet.io/node`` on a VM the controller found Unschedulable
(its nodeSelector, no memory left) would otherwise have it defined and started on that
node, its memory then counted there. The agent acts on a VM only when label and placement
both name its node (``reconcile.claim``); the migration hand-over writes the placement
first, so the target still takes a migrated VM.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from tests.agent.test_snapshots import add

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.snapshot.agent import SnapshotAgent
from virtfleet.hypervisor import Hypervisor
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.claim import Claim, vm_claim

NODE, OTHER = "node-a", "node-b"
KEY = ("ns", "vm")
UID = "11111111-2222-4333-8444-555555555555"


def vm_body(label: str | None, placed: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "ns", "name": "vm", "uid": UID, "generation": 1}
    if label is not None:
        meta["labels"] = {NODE_LABEL: label}
    body: dict[str, Any] = {
        "metadata": meta,
        "spec": {
            "memory": {"size": "64Mi"},
            "kernel": {"image": "guest-vmlinuz", "cmdline": "console=ttyS0"},
        },
    }
    if placed is not None:
        body["status"] = {"nodeName": placed}
    return body


@pytest.mark.parametrize(
    ("label", "placed", "claim"),
    [
        (NODE, NODE, Claim.MINE),
        (NODE, None, Claim.UNPLACED),  # a label the controller never wrote
        (NODE, "", Claim.UNPLACED),
        (NODE, OTHER, Claim.ELSEWHERE),  # hand-over: placed on the target, label follows
        (OTHER, NODE, Claim.ELSEWHERE),
        (None, NODE, Claim.ELSEWHERE),  # placed, label not written yet: the watch waits
        (None, None, Claim.ELSEWHERE),
    ],
)
def test_claim(label: str | None, placed: str | None, claim: Claim) -> None:
    assert vm_claim(vm_body(label, placed), NODE) is claim


@pytest.fixture
def agent(hv: Hypervisor) -> tuple[Agent, FakeKube]:
    kube = FakeKube()
    settings = AgentSettings(node_name=NODE, serial_log_dir="/serial")
    return Agent(settings, hv, kube), kube


async def test_a_labelled_but_unplaced_vm_is_never_defined(
    agent: tuple[Agent, FakeKube], hv: Hypervisor
) -> None:
    the_agent, kube = agent
    body = kube.put("VirtualMachine", vm_body(NODE, None))
    the_agent.on_vm_event("ADDED", body)
    the_agent.on_vm_event("MODIFIED", body)  # said once, not per event
    assert KEY not in the_agent.cache
    assert await the_agent.reconcile(KEY) is None
    assert await hv.lookup(UID) is None
    assert "status" not in await kube.get("VirtualMachine", *KEY)  # nothing written
    assert the_agent.unplaced == {UID}
    # Its deletion waits for nothing: nothing was made for it here.
    assert the_agent.never_placed(KEY, body)

    # The controller places it here: from now on it is this node's VM.
    placed = kube.put("VirtualMachine", vm_body(NODE, NODE))
    the_agent.on_vm_event("MODIFIED", placed)
    assert not the_agent.never_placed(KEY, placed)
    for _ in range(3):
        await the_agent.reconcile(KEY)
    guest = await hv.lookup(UID)
    assert guest is not None
    assert (await guest.status()).state.active

    the_agent.on_vm_event("DELETED", placed)
    assert the_agent.unplaced == set()


async def test_a_vm_placed_on_another_node_is_not_taken(
    agent: tuple[Agent, FakeKube], hv: Hypervisor
) -> None:
    the_agent, kube = agent
    body = kube.put("VirtualMachine", vm_body(NODE, OTHER))
    the_agent.on_vm_event("ADDED", body)
    assert KEY not in the_agent.cache
    assert not the_agent.never_placed(KEY, body)  # another node's cleanup, not ours to skip
    assert await hv.lookup(UID) is None


async def test_a_migrated_vm_is_taken_by_the_target(hv: Hypervisor) -> None:
    """Hand-over order: status.nodeName := target (label still the source's), then label."""
    kube = FakeKube()
    target = Agent(AgentSettings(node_name=OTHER, serial_log_dir="/serial"), hv, kube)
    midway = kube.put("VirtualMachine", vm_body(NODE, OTHER))
    assert vm_claim(midway, NODE) is Claim.ELSEWHERE  # the source lets go
    target.on_vm_event("ADDED", midway)
    assert KEY not in target.cache  # not labelled for the target yet
    handed_over = kube.put("VirtualMachine", vm_body(OTHER, OTHER))
    target.on_vm_event("MODIFIED", handed_over)
    assert KEY in target.cache


async def test_snapshots_of_an_unplaced_vm_are_not_taken(
    agent: tuple[Agent, FakeKube], hv: Hypervisor
) -> None:
    the_agent, kube = agent
    the_agent.cache[KEY] = copy.deepcopy(vm_body(NODE, None))  # even if it were cached
    snaps = SnapshotAgent(the_agent, VmLocks())
    add(kube, snaps, "VMSnapshot", "s1", {"vmName": "vm"})
    assert await snaps.reconcile_snapshot(("ns", "s1")) is None
    assert "status" not in await kube.get("VMSnapshot", "ns", "s1")
