"""What a node realises of the VMNetworks, decided without a host or an apiserver."""

from __future__ import annotations

from typing import Any

import yaml

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.identity import derive_mac
from virtfleet.reconcile.network_node import (
    NETWORK_NOT_ALLOWED,
    NETWORK_NOT_FOUND,
    NETWORK_PENDING,
    NetworkView,
    RunningPort,
    attached_networks,
    attachment_problem,
    cloud_init_network_config,
    desired_networks,
    members_of,
)

UID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
OTHER = "6fa459ea-ee8a-3ca4-894e-db77e160355e"


def view(name: str = "red", **body: Any) -> NetworkView:
    spec = {"namespaces": ["team-a"], "subnet": "10.77.0.0/24", **body.pop("spec", {})}
    status = {"vni": 4096, "dhcpAddress": "10.77.0.254", **body.pop("status", {})}
    return NetworkView.from_body({"metadata": {"name": name}, "spec": spec, "status": status})


def address(uid: str, interface: str, ip: str, vm: str = "web") -> dict[str, str]:
    return {"address": ip, "namespace": "team-a", "vm": vm, "uid": uid, "interface": interface}


def spec(*nics: dict[str, Any], cloud_init: dict[str, Any] | None = None) -> VirtualMachineSpec:
    body: dict[str, Any] = {"memory": {"size": "64Mi"}, "interfaces": list(nics)}
    if cloud_init is not None:
        body["cloudInit"] = cloud_init
    return VirtualMachineSpec.model_validate(body)


RED = {"name": "lan", "type": "network", "network": "red"}
USER = {"name": "default"}


def test_a_nic_attaches_only_to_an_existing_network_that_allows_the_namespace() -> None:
    ready = view(status={"addresses": [address(UID, "lan", "10.77.0.2")]})
    assert attachment_problem("team-a", UID, spec(RED), {"red": ready}) is None
    missing = attachment_problem("team-a", UID, spec(RED), {})
    assert missing is not None
    assert missing[0] == NETWORK_NOT_FOUND
    refused = attachment_problem("team-b", UID, spec(RED), {"red": ready})
    assert refused is not None
    assert refused[0] == NETWORK_NOT_ALLOWED
    assert "spec.namespaces" in refused[1]
    everyone = view(spec={"namespaces": ["*"]}, status={"addresses": [address(UID, "lan", "x")]})
    assert attachment_problem("team-b", UID, spec(RED), {"red": everyone}) is None


def test_it_waits_for_the_vni_and_its_address() -> None:
    no_vni = view(status={"vni": None})
    waiting = attachment_problem("team-a", UID, spec(RED), {"red": no_vni})
    assert waiting is not None
    assert waiting[0] == NETWORK_PENDING
    no_address = attachment_problem("team-a", UID, spec(RED), {"red": view()})
    assert no_address is not None
    assert no_address[0] == NETWORK_PENDING
    # Without a subnet there is no address to wait for.
    plain = view(spec={"subnet": None}, status={"dhcpAddress": None})
    assert attachment_problem("team-a", UID, spec(RED), {"red": plain}) is None


def test_a_nic_plugs_into_the_networks_bridge_with_its_mtu_and_address() -> None:
    jumbo = view(
        spec={"mtu": 8950}, status={"vni": 77, "addresses": [address(UID, "lan", "10.77.0.9")]}
    )
    attached = attached_networks(UID, spec(RED, USER), {"red": jumbo})
    assert list(attached) == ["lan"]
    lan = attached["lan"]
    assert (lan.bridge, lan.mtu, lan.address) == ("vfbr77", 8950, "10.77.0.9")


def test_each_network_with_a_member_is_realised_with_the_other_nodes_as_peers() -> None:
    red = view(status={"addresses": [address(UID, "lan", "10.77.0.2"),
                                     address(OTHER, "lan", "10.77.0.3", vm="db")]})  # fmt: skip
    blue = view("blue", status={"vni": 4097})
    members = members_of("team-a", "web", UID, spec(RED))
    wanted = desired_networks(
        members,
        {"red": red, "blue": blue},
        tunnel_address="192.0.2.11",
        peers=["192.0.2.12", "192.0.2.11", "192.0.2.13", ""],
        ports=[RunningPort("vfbr4096", "vnet3", UID), RunningPort("vfbr9", "vnet9", UID)],
    )
    assert [n.name for n in wanted] == ["red"]  # blue has no member here
    (network,) = wanted
    assert (network.vni, network.tunnel_address, network.mtu) == (4096, "192.0.2.11", 1450)
    assert network.peers == ("192.0.2.12", "192.0.2.13")  # never itself
    assert network.taps == ("vnet3",)
    assert network.dhcp is not None
    assert (network.dhcp.address, network.dhcp.prefix_length) == ("10.77.0.254", 24)
    # Only this node's members get a lease from its DHCP server.
    mac = derive_mac(UID, "lan").lower()
    assert [(lease.mac, lease.ip, lease.hostname) for lease in network.dhcp.leases] == [
        (mac, "10.77.0.2", "web")
    ]


def test_no_network_for_a_member_its_network_refuses() -> None:
    members = members_of("team-b", "web", UID, spec(RED))
    assert desired_networks(members, {"red": view()}, tunnel_address="192.0.2.11", peers=[]) == []


def test_dhcp_off_means_no_server() -> None:
    red = view(spec={"dhcp": False}, status={"addresses": [address(UID, "lan", "10.77.0.2")]})
    members = members_of("team-a", "web", UID, spec(RED))
    (network,) = desired_networks(members, {"red": red}, tunnel_address="192.0.2.11", peers=[])
    assert network.dhcp is None


def test_cloud_init_gets_the_same_address_by_mac() -> None:
    red = view(
        spec={"gateway": "10.77.0.1"}, status={"addresses": [address(UID, "lan", "10.77.0.2")]}
    )
    text = cloud_init_network_config(UID, spec(USER, RED), {"red": red})
    assert text is not None
    config = yaml.safe_load(text)
    assert config["version"] == 2
    lan = config["ethernets"]["lan"]
    assert lan["match"] == {"macaddress": derive_mac(UID, "lan").lower()}
    assert lan["addresses"] == ["10.77.0.2/24"]
    assert lan["routes"] == [{"to": "default", "via": "10.77.0.1"}]
    assert lan["mtu"] == 1450
    assert config["ethernets"]["default"]["dhcp4"] is True  # as cloud-init's fallback would
    # Nothing to say without an address.
    assert cloud_init_network_config(UID, spec(USER, RED), {"red": view()}) is None
    assert cloud_init_network_config(UID, spec(USER), {"red": red}) is None


def test_a_running_domain_keeps_its_network_and_lease_without_a_member() -> None:
    """An agent that just started, a migration that just ended: the domain runs here,
    its VM is not in the cache yet. Its network and lease stay, by the record's uid."""
    red = view(status={"addresses": [address(UID, "lan", "10.77.0.2")]})
    mac = derive_mac(UID, "lan").lower()
    ports = [RunningPort("vfbr4096", "vnet0", UID, mac), RunningPort("vfbr4096", "vnet7", OTHER)]
    (network,) = desired_networks(
        [], {"red": red}, tunnel_address="192.0.2.11", peers=[], ports=ports
    )
    # Only the network's own VM's tap is its port (another uid's is not re-attached).
    assert (network.name, network.taps) == ("red", ("vnet0",))
    assert network.dhcp is not None
    assert [(lease.mac, lease.ip, lease.hostname) for lease in network.dhcp.leases] == [
        (mac, "10.77.0.2", "web")
    ]
    assert desired_networks([], {"red": red}, tunnel_address="192.0.2.11", peers=[]) == []


def test_two_networks_with_one_vni_realise_neither() -> None:
    red = view(status={"addresses": [address(UID, "lan", "10.77.0.2")]})
    blue = view("blue", spec={"namespaces": ["*"]})
    members = members_of("team-a", "web", UID, spec(RED))
    wanted = desired_networks(
        members, {"red": red, "blue": blue}, tunnel_address="192.0.2.11", peers=[]
    )
    assert wanted == []


def test_nat_networks_get_a_gateway_and_distinct_uplinks_on_a_node() -> None:
    nat = {"gateway": "10.77.0.1", "nat": True}
    red = view(spec=nat, status={"addresses": [address(UID, "lan", "10.77.0.2")]})
    # A VNI 2^14 - 3 apart maps to the same slot: the later one takes the next.
    blue = view(
        "blue",
        spec=nat,
        status={"vni": 4096 + 16381, "addresses": [address(UID, "wan", "10.77.0.3")]},
    )
    plain = view("plain", spec={"gateway": "10.77.0.1"}, status={"vni": 5000})
    members = members_of(
        "team-a",
        "web",
        UID,
        spec(RED, {"name": "wan", "type": "network", "network": "blue"},
             {"name": "lan2", "type": "network", "network": "plain"}),
    )  # fmt: skip
    found = desired_networks(
        members, {"red": red, "blue": blue, "plain": plain}, tunnel_address="192.0.2.11", peers=[]
    )
    by_name = {network.name: network for network in found}
    red_nat, blue_nat = by_name["red"].dhcp, by_name["blue"].dhcp
    assert red_nat is not None and red_nat.nat is not None  # noqa: PT018
    assert blue_nat is not None and blue_nat.nat is not None  # noqa: PT018
    assert red_nat.nat.address == "10.77.0.1"
    assert red_nat.nat.uplink == "169.254.80.2"  # 169.254.64.2 + 4096 % 16381
    assert blue_nat.nat.uplink == "169.254.80.3"
    plain_dhcp = by_name["plain"].dhcp
    assert plain_dhcp is not None
    assert plain_dhcp.nat is None  # a gateway alone is somebody else's router
