"""The agent's VMNetwork loop without a host or libvirt: what it asks for, and when."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from testkit.kube import FakeKube
from virtfleet.agent.errors import ActionError
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.vmnetworks import NETWORK_UNAVAILABLE, NetworkKeeper
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.hypervisor.bridgeports import BridgePort
from virtfleet.identity import Key
from virtfleet.netmodel import EnsureBridge, NetworkAction, ObservedHost, RemoveNetwork

UID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
NIC = {"name": "lan", "type": "network", "network": "red"}


@dataclass
class PaperHost:
    """Takes every plan, holds nothing; remembers what it was asked."""

    applied: list[NetworkAction] = field(default_factory=list)
    guards: list[tuple[list[str], list[int]]] = field(default_factory=list)

    def observe(self) -> ObservedHost:
        return ObservedHost()

    def apply(self, actions: list[NetworkAction]) -> dict[int, str]:
        self.applied += actions
        return {}

    def guard(self, peers: Iterable[str], vnis: Iterable[int]) -> bool:
        self.guards.append((list(peers), list(vnis)))
        return False


class NoQueue:
    def __init__(self) -> None:
        self.added: list[Key] = []

    def add(self, key: Key) -> None:
        self.added.append(key)


class Libvirt:
    def __init__(self) -> None:
        self.ports: list[BridgePort] = []

    async def bridge_ports(self) -> list[BridgePort]:
        return self.ports


@dataclass
class FakeAgent:
    settings: AgentSettings
    kube: FakeKube
    hv: Libvirt = field(default_factory=Libvirt)
    queue: NoQueue = field(default_factory=NoQueue)
    cache: dict[Key, dict[str, Any]] = field(default_factory=dict)


def keeper(tunnel: str | None = "192.0.2.11") -> tuple[NetworkKeeper, FakeAgent, PaperHost]:
    agent = FakeAgent(AgentSettings(node_name="node-a", tunnel_address=tunnel), FakeKube())
    host = PaperHost()
    return NetworkKeeper(agent, host), agent, host  # type: ignore[arg-type]


def network(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "red"},
        "spec": {"namespaces": ["team-a"], "subnet": "10.77.0.0/24"},
        "status": {"vni": 4096, "dhcpAddress": "10.77.0.254", **status},
    }


def vm_body(uid: str = UID) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team-a", "name": "web", "uid": uid},
        "spec": {"memory": {"size": "64Mi"}, "interfaces": [NIC]},
    }


def spec() -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(vm_body()["spec"])


RECORD = {"address": "10.77.0.2", "namespace": "team-a", "vm": "web", "uid": UID,
          "interface": "lan"}  # fmt: skip


def test_attach_says_why_a_nic_cannot_plug_in_and_whether_to_wait() -> None:
    keep, _, _ = keeper()
    with pytest.raises(ActionError) as missing:
        keep.attach("team-a", UID, spec())
    assert (missing.value.reason, missing.value.permanent) == ("NetworkNotFound", True)
    keep.on_network_event("ADDED", network())
    with pytest.raises(ActionError) as waiting:
        keep.attach("team-a", UID, spec())
    assert (waiting.value.reason, waiting.value.permanent) == ("WaitingForNetwork", False)
    keep.on_network_event("MODIFIED", network(addresses=[RECORD]))
    attached = keep.attach("team-a", UID, spec())
    assert (attached["lan"].bridge, attached["lan"].address) == ("vfbr4096", "10.77.0.2")
    assert keep.addresses(UID, spec()) == {"lan": "10.77.0.2"}


def test_a_node_without_a_tunnel_address_refuses_vmnetwork_nics() -> None:
    keep, _, _ = keeper(tunnel=None)
    keep.on_network_event("ADDED", network(addresses=[RECORD]))
    with pytest.raises(ActionError) as refused:
        keep.attach("team-a", UID, spec())
    assert (refused.value.reason, refused.value.permanent) == (NETWORK_UNAVAILABLE, True)


def test_peers_are_other_nodes_with_a_valid_tunnel_address() -> None:
    keep, _, _ = keeper()
    for name, address in (("node-a", "192.0.2.11"), ("node-b", "192.0.2.12"),
                          ("node-c", "not-an-ip"), ("node-d", None)):  # fmt: skip
        keep.on_host_event("ADDED", {"metadata": {"name": name},
                                     "status": {"tunnelAddress": address}})  # fmt: skip
    assert keep.peers == {"node-b": "192.0.2.12"}
    keep.on_host_event("DELETED", {"metadata": {"name": "node-b"}})
    assert keep.peers == {}


def test_a_migration_to_this_node_makes_its_vm_a_member_until_it_ends() -> None:
    keep, _, _ = keeper()
    body = {"metadata": {"namespace": "team-a", "name": "move"},
            "status": {"targetNode": "node-a", "phase": "Running"}}  # fmt: skip
    keep.on_migration_event("ADDED", body)
    assert keep.incoming == {("team-a", "move"): None}
    keep.on_migration_event(
        "MODIFIED", {**body, "status": {**body["status"], "phase": "Succeeded"}}
    )
    assert keep.incoming == {}
    keep.on_migration_event("ADDED", {**body, "status": {"targetNode": "node-b"}})
    assert keep.incoming == {}


def test_a_pass_realises_the_members_networks_and_guards_them() -> None:
    keep, agent, host = keeper()
    keep.on_network_event("ADDED", network(addresses=[RECORD]))
    keep.on_host_event("ADDED", {"metadata": {"name": "node-b"},
                                 "status": {"tunnelAddress": "192.0.2.12"}})  # fmt: skip
    agent.cache[("team-a", "web")] = vm_body()
    asyncio.run(keep.sync())
    assert any(isinstance(a, EnsureBridge) for a in host.applied)
    assert host.guards == [(["192.0.2.12"], [4096])]
    assert keep.realised == {"red": 4096}
    # The last member leaves: the next pass takes the network off the node (the paper
    # host still shows nothing, so there is nothing to remove; the realised set empties).
    agent.cache.clear()
    host.applied.clear()
    asyncio.run(keep.sync())
    assert keep.realised == {}
    assert not [a for a in host.applied if isinstance(a, EnsureBridge)]


def test_a_running_domain_keeps_its_network_before_its_vm_is_known() -> None:
    """An agent that just restarted: the cache is empty, the domain runs on the bridge."""
    keep, agent, host = keeper()
    keep.on_network_event("ADDED", network(addresses=[RECORD]))
    agent.hv.ports = [BridgePort(UID, "vfbr4096", "vnet0", None)]
    asyncio.run(keep.sync())
    assert keep.realised == {"red": 4096}
    assert not [a for a in host.applied if isinstance(a, RemoveNetwork)]


def test_the_heartbeat_is_hurried_once_per_change() -> None:
    keep, _, _ = keeper()

    async def check() -> None:
        keep.realised = {"red": 4096}
        started = asyncio.get_running_loop().time()
        await keep.host_changed(5.0)  # differs from what was reported: at once
        await keep.host_changed(0.05)  # the same change again (a failed write): waits
        assert asyncio.get_running_loop().time() - started >= 0.05

    asyncio.run(check())
