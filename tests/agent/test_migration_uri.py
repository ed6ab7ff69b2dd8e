"""The migration URI a node publishes: how other nodes reach its libvirtd.

An agent in a pod talks to its libvirtd over ``qemu:///system``, which means "here" on
every node: publishing that made every migration's source connect to itself. The chart
sets ``--migration-uri`` (a pattern with ``$(NODE_NAME)``) or one URI per node.
"""

from __future__ import annotations

import pytest

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.command import node_migration_uri
from virtfleet.agent.host import host_status
from virtfleet.agent.settings import AgentSettings
from virtfleet.hypervisor import Hypervisor


def test_a_node_entry_wins_over_the_pattern() -> None:
    per_node = ["node-a=qemu+tcp://a:1/system", "node-b=qemu+tcp://b:2/system"]
    assert node_migration_uri("node-b", "qemu+tls://node-b/system", per_node) == (
        "qemu+tcp://b:2/system"
    )
    assert node_migration_uri("node-c", "qemu+tls://node-c/system", per_node) == (
        "qemu+tls://node-c/system"
    )
    assert node_migration_uri("node-c", None, per_node) is None
    assert node_migration_uri("node-c", "", None) is None


@pytest.mark.parametrize("bad", ["node-a", "=qemu:///system", "node-a="])
def test_a_malformed_node_entry_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="expected NODE=URI"):
        node_migration_uri("node-a", None, [bad])


async def test_the_vmhost_publishes_the_migration_uri(hv: Hypervisor) -> None:
    plain = Agent(AgentSettings(node_name="node-a", libvirt_uri="qemu:///system"), hv, FakeKube())
    assert (await host_status(plain, None)).migration_uri == "qemu:///system"
    settings = AgentSettings(
        node_name="node-a",
        libvirt_uri="qemu:///system",
        migration_uri="qemu+tls://node-a/system",
        disk_pools=("virtfleet-local",),
    )
    published = await host_status(Agent(settings, hv, FakeKube()), None)
    assert published.migration_uri == "qemu+tls://node-a/system"
