"""The node admin's network policy: allow-lists, the nwfilter, the user-NIC firewall."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from typing import Any

import pytest
from lxml import etree

from virtfleet.agent import guestfirewall, network
from virtfleet.agent.driver import ActionError, NodeDriver
from virtfleet.agent.guestfirewall import GuestFirewall, removal, ruleset, table_name
from virtfleet.agent.network import NetworkPolicy, policy_from_args, refusal
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.virtualmachine import VirtualMachineSpec, VirtualMachineStatus
from virtfleet.cli import build_parser
from virtfleet.hypervisor import HostFacts, Hypervisor, storage
from virtfleet.reconcile.vm import VmView

UID = "11111111-2222-4333-8444-555555555555"


def spec(*nics: dict[str, Any]) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(
        {
            "memory": {"size": "64Mi"},
            "kernel": {"image": "guest-vmlinuz"},
            "disks": [{"name": "data", "size": "16Mi", "source": {"blank": {}}}],
            "interfaces": list(nics),
        }
    )


def view(*nics: dict[str, Any], namespace: str = "team-a") -> VmView:
    return VmView(
        namespace=namespace,
        name="vm",
        uid=UID,
        generation=1,
        node="node-a",
        spec=spec(*nics),
        status=VirtualMachineStatus(),
    )


BRIDGE = {"name": "lan", "type": "bridge", "bridge": "br0"}
NETWORK = {"name": "svc", "type": "network", "network": "default"}
USER = {"name": "default"}


# --- allow-lists ----------------------------------------------------------------------------


def test_nothing_is_allowed_by_default() -> None:
    policy = NetworkPolicy()
    why = refusal("team-a", spec(BRIDGE), policy)
    assert why is not None
    assert "'br0'" in why
    assert "'team-a'" in why
    assert "--allow-bridge" in why
    assert "agent.network.allowedBridges" in why
    # A VMNetwork's own spec.namespaces decides (agent.vmnetworks), not the node's list.
    assert refusal("team-a", spec(NETWORK), policy) is None


def test_a_namespace_or_every_namespace_may_be_allowed() -> None:
    policy = NetworkPolicy(allowed_bridges={"team-a": frozenset({"br0"}), "*": frozenset({"br1"})})
    assert refusal("team-a", spec(BRIDGE, USER), policy) is None
    assert refusal("team-b", spec(BRIDGE), policy) is not None
    assert refusal("team-b", spec({**BRIDGE, "bridge": "br1"}), policy) is None
    assert refusal("team-a", spec({**BRIDGE, "bridge": "default"}), policy) is not None


def test_user_nics_need_the_firewall_unless_the_admin_opts_in() -> None:
    assert network.needs_firewall(spec(USER), NetworkPolicy())
    assert not network.needs_firewall(spec(BRIDGE), NetworkPolicy())
    assert not network.needs_firewall(spec(USER), NetworkPolicy(user_host_access=True))


def test_flags_become_the_policy() -> None:
    args = build_parser().parse_args(
        [
            "agent", "--node", "n",
            "--allow-bridge", "team-a=br0,br1", "--allow-bridge", "*=br2",
            "--allow-bridge", "team-a=br3",
            "--nwfilter", "none",
            "--qemu-gid", "107",
            "--user-nic-allow-local-port", "53", "--user-nic-allow-local-port", "49152-49215",
            "--user-nic-deny-cidr", "100.100.100.200/32",
        ]
    )  # fmt: skip
    policy = policy_from_args(args)
    assert policy.allowed_bridges == {"team-a": {"br0", "br1", "br3"}, "*": {"br2"}}
    assert policy.nwfilter is None
    assert policy.qemu_gid == 107
    assert policy.user_nic_local_ports == ("53", "49152-49215")
    assert policy.user_nic_deny == ("100.100.100.200/32",)
    assert not policy.user_host_access
    defaults = policy_from_args(build_parser().parse_args(["agent", "--node", "n"]))
    assert defaults == NetworkPolicy()


@pytest.mark.parametrize(
    "flags",
    [
        ["--allow-bridge", "br0"],
        ["--allow-bridge", "team-a="],
        ["--user-nic-allow-local-port", "0"],
        ["--user-nic-allow-local-port", "70000"],
        ["--user-nic-allow-local-port", "20-10"],
        ["--user-nic-deny-cidr", "nowhere"],
        ["--qemu-gid", "0"],  # root's group: the table would fence the whole host
        ["--qemu-gid", "qemu"],
    ],
)
def test_bad_flags_stop_the_agent_at_start(flags: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--node", "n", *flags])


def test_a_bad_nwfilter_name_is_refused() -> None:
    with pytest.raises(ValueError, match="nwfilter"):
        NetworkPolicy(nwfilter="x'/><hostdev")


# --- the driver refuses before anything is made ---------------------------------------------


@pytest.fixture
def driver(hv: Hypervisor) -> NodeDriver:
    policy = NetworkPolicy(allowed_bridges={"team-a": frozenset({"br0"})})
    return NodeDriver(
        hv, AgentSettings(node_name="node-a", serial_log_dir="/serial", network=policy)
    )


async def nothing_made(hv: Hypervisor) -> None:
    assert await hv.lookup(UID) is None
    assert not [v for v in await storage.list_volumes(hv, "virtfleet-local") if UID in v.name]


async def test_a_bridge_not_allowed_is_stalled_and_nothing_is_made(
    driver: NodeDriver, hv: Hypervisor
) -> None:
    with pytest.raises(ActionError) as caught:
        await driver.observe(view(BRIDGE, namespace="team-b"))
    assert caught.value.reason == "NetworkNotAllowed"
    assert caught.value.permanent
    assert "'team-b'" in caught.value.message
    await nothing_made(hv)


async def test_a_user_nic_waits_for_the_firewall(driver: NodeDriver, hv: Hypervisor) -> None:
    with pytest.raises(ActionError) as caught:
        await driver.observe(view(USER))
    assert caught.value.reason == guestfirewall.GUEST_FIREWALL_UNAVAILABLE
    assert "--user-nic-host-access" in caught.value.message
    await nothing_made(hv)
    driver.firewall.error = None  # the table is in place
    snap = await driver.observe(view(USER))
    assert snap.inputs is not None


async def test_an_allowed_bridge_is_rendered_with_clean_traffic(driver: NodeDriver) -> None:
    snap = await driver.observe(view(BRIDGE))
    assert snap.inputs is not None
    assert snap.inputs.nwfilter == "clean-traffic"
    from virtfleet.domain import render_xml

    root = etree.fromstring(render_xml(snap.inputs).encode())
    ref = root.find("devices/interface/filterref")
    assert ref is not None
    assert ref.get("filter") == "clean-traffic"


# --- the firewall table ---------------------------------------------------------------------


def test_table_names_are_per_node_and_nft_safe() -> None:
    assert table_name("node-a") == "virtfleet_node_a"
    assert table_name("a.b-c") == "virtfleet_a_b_c"


def test_the_ruleset_fences_qemus_new_connections() -> None:
    text = ruleset("node-a", NetworkPolicy(qemu_gid=64601, user_nic_local_ports=("49152-49215",)))
    lines = [line.strip() for line in text.splitlines()]
    # Atomic replacement: create (if missing), delete, define, in one nft transaction.
    assert lines[:3] == [
        "table inet virtfleet_node_a",
        "delete table inet virtfleet_node_a",
        "table inet virtfleet_node_a {",
    ]
    assert "meta skgid 64601 ct state { new, untracked } jump user_nics" in lines
    assert "ip daddr { 169.254.0.0/16 } goto refuse" in lines
    assert "ip6 daddr { fe80::/10, fd00:ec2::254/128 } goto refuse" in lines
    exception = "fib daddr type local meta l4proto { tcp, udp } th dport { 49152-49215 } accept"
    assert lines.index(exception) < lines.index("fib daddr type local goto refuse")
    assert "meta l4proto tcp reject with tcp reset" in lines
    without = ruleset("node-a", NetworkPolicy(user_nic_deny=("10.0.0.0/8",)))
    assert "th dport" not in without
    assert "ip6 daddr" not in without
    assert removal("node-a") == (
        "table inet virtfleet_node_a\ndelete table inet virtfleet_node_a\n"
    )


def _nft_can_check() -> bool:
    binary = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if binary is None:
        return False
    probe = subprocess.run(
        [binary, "-c", "-f", "-"],
        input="table inet vf_probe {}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _nft_can_check(), reason="needs nft and CAP_NET_ADMIN (nft --check)")
def test_nft_accepts_the_ruleset() -> None:
    binary = shutil.which("nft") or "/usr/sbin/nft"
    policy = NetworkPolicy(user_nic_local_ports=("53", "49152-49215"))
    for script in (ruleset("unit-test", policy), removal("unit-test")):
        result = subprocess.run(
            [binary, "-c", "-f", "-"], input=script, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


async def test_ensure_reports_what_nft_said(monkeypatch: pytest.MonkeyPatch) -> None:
    scripts: list[str] = []
    answer: list[str | None] = ["nft refused the table (exit 1): no such file"]

    def fake_nft(script: str) -> str | None:
        scripts.append(script)
        return answer[0]

    monkeypatch.setattr(guestfirewall, "_run_nft", fake_nft)
    firewall = GuestFirewall("node-a", NetworkPolicy())
    assert not firewall.ready
    assert not await firewall.ensure()
    assert firewall.error == answer[0]
    answer[0] = None
    assert await firewall.ensure()
    assert firewall.error is None
    assert scripts == [ruleset("node-a", NetworkPolicy())] * 2

    opted_in = GuestFirewall("node-a", dataclasses.replace(NetworkPolicy(), user_host_access=True))
    answer[0] = "nft is gone"
    assert await opted_in.ensure()  # nothing to fence: ready even when removal fails
    assert scripts[-1] == removal("node-a")


class ElsewhereHv:
    """A hypervisor whose libvirtd runs on another host (the agent in a pod of its own)."""

    async def host_facts(self) -> Any:
        return dataclasses.replace(FACTS, hostname="some-other-node.example")


FACTS = HostFacts(
    hostname="x",
    hypervisor_type="QEMU",
    hypervisor_version="7.2.0",
    libvirt_version="9.0.0",
    cpus=1,
    memory_bytes=2**30,
    free_memory_bytes=2**29,
)


async def test_a_table_outside_the_hosts_network_namespace_does_not_count(
    monkeypatch: pytest.MonkeyPatch, hv: Hypervisor
) -> None:
    monkeypatch.setattr(guestfirewall, "_run_nft", lambda script: None)
    firewall = GuestFirewall("node-a", NetworkPolicy())
    assert not await firewall.ensure(ElsewhereHv())  # type: ignore[arg-type]
    assert firewall.error is not None
    assert "hostNetwork" in firewall.error
    assert "some-other-node.example" in firewall.error
    # libvirt's test driver runs here, on this host.
    assert await firewall.ensure(hv)
