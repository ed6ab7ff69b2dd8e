"""The agent's per-VM memory is dropped with the VM: churn must not grow it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineStatus
from virtfleet.domain.guestagent import GuestAgentReport
from virtfleet.hypervisor import Hypervisor
from virtfleet.reconcile.views import LAST_APPLIED, slim
from virtfleet.runtime.kube import KubeApi
from virtfleet.runtime.kubeapi import KindLike

KEY = ("ns", "web")


def vm(uid: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "web",
            "uid": uid,
            "resourceVersion": "1",
            "labels": {"virtfleet.io/node": "node-a"},
        },
        "spec": {"memory": {"size": "64Mi"}},
        "status": {"nodeName": "node-a"},
    }


async def test_a_deleted_vm_leaves_nothing_behind(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    agent.on_vm_event("ADDED", vm("u1"))
    assert KEY in agent.cache
    agent.finalized[KEY] = asyncio.Event()
    agent.finalized[KEY].set()  # the first VM was cleaned up

    agent.on_vm_event("DELETED", vm("u1"))

    assert KEY not in agent.cache
    assert "u1" not in agent.by_uid
    assert KEY not in agent.finalized


async def test_a_new_vm_of_the_same_name_is_not_finalized_by_the_old_one(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    agent.on_vm_event("ADDED", vm("u1"))
    agent.finalized.setdefault(KEY, asyncio.Event()).set()
    agent.on_vm_event("DELETED", vm("u1"))
    agent.on_vm_event("ADDED", vm("u2"))

    # kopf's deletion handler of the new VM must wait for the new VM's own cleanup.
    assert not await agent.wait_finalized(KEY, 0.05)


def test_the_cache_keeps_no_managed_fields_and_no_kubectl_copy() -> None:
    body = vm("u-1")
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    body["metadata"]["annotations"] = {LAST_APPLIED: '{"spec": {}}', "keep": "me"}
    slimmed = slim(body)
    assert "managedFields" not in slimmed["metadata"]
    assert slimmed["metadata"]["annotations"] == {"keep": "me"}
    assert slimmed["metadata"]["uid"] == "u-1"
    assert "managedFields" in body["metadata"]  # the event's own body is left as it was


class LateResponseKube(FakeKube):
    """The apiserver applies the agent's status write, then the controller writes
    ``Unknown`` and its watch event reaches the agent before the write's response does."""

    def __init__(self, agent_box: list[Agent]) -> None:
        super().__init__()
        self.agent_box = agent_box
        self.responses: list[dict[str, Any]] = []

    async def patch_status(
        self,
        kind: KindLike,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        response = await super().patch_status(
            kind, namespace, name, patch, resource_version=resource_version
        )
        if not self.responses:
            stored = self.get_now("VirtualMachine", namespace, name)
            stored["status"]["printableStatus"] = "Unknown"
            self.agent_box[0].on_vm_event("MODIFIED", self.put("VirtualMachine", stored))
        self.responses.append(response)
        return response


async def test_a_late_write_response_never_rolls_back_a_later_writers_status(
    hv: Hypervisor,
) -> None:
    box: list[Agent] = []
    kube = LateResponseKube(box)
    agent = Agent(AgentSettings(node_name="node-a"), hv, kube)
    box.append(agent)
    body = kube.put("VirtualMachine", vm("u1"))
    agent.on_vm_event("ADDED", body)
    stopped = VirtualMachineStatus(node_name="node-a", printable_status=PrintableStatus.STOPPED)

    await agent._write_status(body, stopped)

    # The cache keeps the controller's later copy, not the agent's own older response...
    assert agent.cache[KEY]["status"]["printableStatus"] == "Unknown"
    # ...and a pass that read the agent's own copy (which says Stopped already) still
    # writes its truth: the difference is taken from the newest copy known.
    (own,) = kube.responses
    assert own["status"]["printableStatus"] == "Stopped"
    await agent._write_status(own, stopped)
    assert kube.get_now("VirtualMachine", "ns", "web")["status"]["printableStatus"] == "Stopped"
    assert agent.cache[KEY]["status"]["printableStatus"] == "Stopped"


async def test_a_guest_agent_answer_for_a_vm_that_left_meanwhile_is_not_kept(
    hv: Hypervisor,
) -> None:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    running = vm("u1")
    running["status"]["printableStatus"] = "Running"
    agent.on_vm_event("ADDED", running)

    async def ask_while_it_leaves(uid: str) -> GuestAgentReport:
        agent.on_vm_event("DELETED", running)
        return GuestAgentReport(connected=False)

    agent.guest_agents._ask = ask_while_it_leaves  # type: ignore[method-assign]
    await agent.guest_agents.ask_all()
    assert agent.guest_agents.reports == {}
    assert agent.bookkeeping()["guest_agent_reports"] == 0

    # A report of a VM that is gone from the cache goes with the next round.
    agent.guest_agents.reports["gone"] = GuestAgentReport(connected=True)
    await agent.guest_agents.ask_all()
    assert agent.guest_agents.reports == {}


async def test_a_guest_left_frozen_is_thawed_after_the_limit_with_an_event(
    hv: Hypervisor,
) -> None:
    events: list[tuple[str, str]] = []

    class Events:
        async def record_event(self, body: Any, kind: str, reason: str, *_: Any) -> None:
            events.append((kind, reason))

    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, Events()))
    now = [0.0]
    agent.guest_agents.clock = lambda: now[0]
    agent.guest_agents.thaw_after = 300.0
    running = vm("u1")
    running["status"]["printableStatus"] = "Running"
    agent.on_vm_event("ADDED", running)
    frozen = GuestAgentReport(connected=False, error="... frozen state", frozen=True)
    answers = [frozen, frozen, frozen, GuestAgentReport(connected=True)]
    thawed: list[str] = []

    async def ask(uid: str) -> GuestAgentReport:
        return answers.pop(0)

    async def lookup(uid: str) -> Any:
        thawed.append(uid)
        return None  # no domain to thaw in the test driver: the call is what counts

    agent.guest_agents._ask = ask  # type: ignore[method-assign]
    agent.hv.lookup = lookup  # type: ignore[method-assign,assignment]
    await agent.guest_agents.ask_all()  # first seen frozen at 0
    now[0] = 299.0
    await agent.guest_agents.ask_all()  # a snapshot's freeze could still be going on
    assert thawed == []
    assert agent.bookkeeping()["frozen_guests"] == 1
    now[0] = 301.0
    await agent.guest_agents.ask_all()
    assert thawed == ["u1"]
    assert events == [("Warning", "GuestThawed")]
    assert agent.bookkeeping()["frozen_guests"] == 0
    await agent.guest_agents.ask_all()  # answers again: nothing more
    assert thawed == ["u1"]
