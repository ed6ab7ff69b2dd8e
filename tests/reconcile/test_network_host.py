"""The VMNetwork planner: from desired networks and what the node has, to actions."""

from __future__ import annotations

import dataclasses

import pytest

from virtfleet.netmodel import (
    NatGateway,
    PlugGateway,
    fingerprint,
    gateway_done_alias,
    read_fingerprint,
    uplink_addresses,
)
from virtfleet.reconcile.network_dhcp import dhcp_hostname, dnsmasq_config, dnsmasq_hosts
from virtfleet.reconcile.network_host import (
    DhcpConfig,
    EnsureBridge,
    EnsurePort,
    EnsureVxlan,
    Lease,
    LocalNetwork,
    NetworkAction,
    ObservedDhcp,
    ObservedHost,
    ObservedLink,
    ReloadDhcp,
    RemoveNetwork,
    SetFloodPeers,
    StartDhcp,
    StopDhcp,
    plan,
    repairs,
)

DHCP = DhcpConfig(
    address="10.50.0.2",
    prefix_length=24,
    gateway="10.50.0.1",
    leases=(Lease("52:54:00:AA:00:01", "10.50.0.10", "web.prod"),),
)
NET = LocalNetwork(
    name="default/blue",
    vni=42,
    tunnel_address="192.0.2.1",
    peers=("192.0.2.2", "192.0.2.3"),
    dhcp=DHCP,
    taps=("vnet3",),
)


def realised(network: LocalNetwork = NET) -> ObservedHost:
    """The node exactly as ``network`` wants it, with the tap attached."""
    vni = network.vni
    br, vx, dh = f"vfbr{vni}", f"vfvx{vni}", f"vfdh{vni}"
    links = {
        br: ObservedLink(br, "bridge", network.mtu, stp=False, forward_delay=0),
        vx: ObservedLink(
            vx,
            "vxlan",
            network.mtu,
            master=br,
            isolated=True,
            vni=vni,
            local=network.tunnel_address,
            udp_port=4789,
            learning=True,
        ),
        "vnet3": ObservedLink("vnet3", "tun", network.mtu, master=br),
        "eth0": ObservedLink("eth0", "", 1500),
    }
    dhcp = {}
    if network.dhcp is not None:
        links[dh] = ObservedLink(dh, "veth", network.mtu, master=br, isolated=True)
        dhcp[vni] = ObservedDhcp(
            vni,
            pid=1234,
            config_fingerprint=read_fingerprint(dnsmasq_config(network)),
            hosts_fingerprint=fingerprint(dnsmasq_hosts(network.dhcp)),
        )
    peers = frozenset(network.peers) - {network.tunnel_address}
    return ObservedHost(links=links, flood={vx: peers}, dhcp=dhcp)


def without(observed: ObservedHost, *names: str) -> ObservedHost:
    links = {k: v for k, v in observed.links.items() if k not in names}
    return dataclasses.replace(observed, links=links)


def changed(observed: ObservedHost, name: str, **fields: object) -> ObservedHost:
    links = dict(observed.links)
    links[name] = dataclasses.replace(links[name], **fields)  # type: ignore[arg-type]
    return dataclasses.replace(observed, links=links)


def kinds(actions: list[NetworkAction]) -> list[str]:
    return [type(action).__name__ for action in actions]


def test_an_empty_node_gets_bridge_vxlan_flood_entries_dhcp_and_isolated_ports() -> None:
    actions = plan([NET], ObservedHost())
    assert kinds(actions) == [
        "EnsureBridge",
        "EnsureVxlan",
        "EnsurePort",
        "SetFloodPeers",
        "StartDhcp",
        "EnsurePort",
    ]
    bridge, vxlan, vx_port, flood, dhcp, dh_port = actions
    assert bridge == EnsureBridge("default/blue", 42, 1450, reason="bridge vfbr42 was missing")
    assert isinstance(vxlan, EnsureVxlan)
    assert (vxlan.local, vxlan.mtu, vxlan.recreate) == ("192.0.2.1", 1450, False)
    assert vx_port == EnsurePort("default/blue", 42, "vfvx42", True, reason="port of vfbr42")
    assert isinstance(flood, SetFloodPeers)
    assert (flood.add, flood.remove) == (("192.0.2.2", "192.0.2.3"), ())
    assert isinstance(dhcp, StartDhcp)
    assert (dhcp.address, dhcp.prefix_length, dhcp.restart) == ("10.50.0.2", 24, False)
    assert isinstance(dh_port, EnsurePort)
    assert (dh_port.ifname, dh_port.isolated) == ("vfdh42", True)
    assert repairs(actions) == [], "a first creation is no repair"


def test_a_node_as_desired_needs_nothing() -> None:
    assert plan([NET], realised()) == []
    plain = dataclasses.replace(NET, dhcp=None)
    assert plan([plain], realised(plain)) == []


def test_the_own_tunnel_address_is_never_a_flood_peer() -> None:
    network = dataclasses.replace(NET, peers=("192.0.2.1", "192.0.2.2"))
    flood = [a for a in plan([network], ObservedHost()) if isinstance(a, SetFloodPeers)]
    assert flood[0].add == ("192.0.2.2",)


def test_peers_that_come_and_go_change_only_the_flood_entries() -> None:
    network = dataclasses.replace(NET, peers=("192.0.2.2", "192.0.2.9"))
    actions = plan([network], realised())
    assert actions == [
        SetFloodPeers(
            "default/blue",
            42,
            add=("192.0.2.9",),
            remove=("192.0.2.3",),
            reason="peers +192.0.2.9 -192.0.2.3",
        )
    ]
    assert repairs(actions) == []


def test_a_vxlan_made_for_another_tunnel_address_is_recreated_with_every_peer() -> None:
    actions = plan([NET], changed(realised(), "vfvx42", local="192.0.2.77"))
    assert kinds(actions) == ["EnsureVxlan", "EnsurePort", "SetFloodPeers"]
    vxlan, _, flood = actions
    assert isinstance(vxlan, EnsureVxlan)
    assert vxlan.recreate
    assert not vxlan.drift
    assert isinstance(flood, SetFloodPeers)
    assert flood.add == ("192.0.2.2", "192.0.2.3")


def test_a_vxlan_with_another_vni_or_learning_off_is_drift_and_recreated() -> None:
    for fields in ({"vni": 7}, {"learning": False}, {"udp_port": 8472}):
        actions = plan([NET], changed(realised(), "vfvx42", **fields))
        vxlan = actions[0]
        assert isinstance(vxlan, EnsureVxlan), fields
        assert (vxlan.recreate, vxlan.drift) == (True, True), fields


def test_a_new_mtu_is_set_in_place_and_offered_by_dhcp() -> None:
    network = dataclasses.replace(NET, mtu=1400)
    actions = plan([network], realised())
    assert kinds(actions) == ["EnsureBridge", "EnsureVxlan", "StartDhcp", "EnsurePort"]
    bridge, vxlan, dhcp, _ = actions
    assert isinstance(bridge, EnsureBridge)
    assert bridge.mtu == 1400
    assert not bridge.replace
    assert isinstance(vxlan, EnsureVxlan)
    assert vxlan.mtu == 1400
    assert not vxlan.recreate
    assert isinstance(dhcp, StartDhcp)
    assert dhcp.restart
    assert "option:mtu,1400" in dhcp.config
    assert repairs(actions) == []


def test_a_deleted_vxlan_is_a_repair() -> None:
    actions = plan([NET], without(realised(), "vfvx42"))
    assert kinds(actions) == ["EnsureVxlan", "EnsurePort", "SetFloodPeers"]
    assert repairs(actions) == [actions[0]]
    assert actions[0].reason == "vxlan vfvx42 was missing"


def test_a_deleted_bridge_is_a_repair_and_every_port_goes_back() -> None:
    actions = plan([NET], without(realised(), "vfbr42"))
    assert kinds(actions) == ["EnsureBridge", "EnsurePort", "EnsurePort", "EnsurePort"]
    ports = [a.ifname for a in actions if isinstance(a, EnsurePort)]
    assert ports == ["vfvx42", "vfdh42", "vnet3"]
    assert repairs(actions) == [actions[0]]


def test_a_detached_or_isolated_tap_is_a_repair() -> None:
    for fields, reason in (
        ({"master": None}, "vnet3 was detached; attached to vfbr42"),
        ({"master": "virbr0"}, "vnet3 was attached to virbr0; attached to vfbr42"),
        ({"isolated": True}, "vnet3 was isolated"),
    ):
        actions = plan([NET], changed(realised(), "vnet3", **fields))
        assert actions == [
            EnsurePort("default/blue", 42, "vnet3", isolated=False, drift=True, reason=reason)
        ]


def test_a_tap_that_does_not_exist_yet_is_left_to_libvirt() -> None:
    assert plan([NET], without(realised(), "vnet3")) == []


def test_a_non_isolated_vxlan_port_or_a_bridge_with_stp_is_a_repair() -> None:
    actions = plan([NET], changed(realised(), "vfvx42", isolated=False))
    assert actions == [
        EnsurePort("default/blue", 42, "vfvx42", True, drift=True, reason="vfvx42 was not isolated")
    ]
    actions = plan([NET], changed(realised(), "vfbr42", stp=True, up=False))
    assert actions == [
        EnsureBridge("default/blue", 42, 1450, drift=True, reason="bridge vfbr42: down, STP on")
    ]


def test_a_link_of_another_kind_under_our_name_is_replaced() -> None:
    observed = changed(realised(), "vfbr42", kind="dummy")
    bridge = plan([NET], observed)[0]
    assert isinstance(bridge, EnsureBridge)
    assert bridge.replace
    assert bridge.drift


def test_new_leases_reload_dhcp_without_a_restart() -> None:
    more = Lease("52:54:00:aa:00:02", "10.50.0.11", "db")
    network = dataclasses.replace(NET, dhcp=dataclasses.replace(DHCP, leases=(*DHCP.leases, more)))
    actions = plan([network], realised())
    assert kinds(actions) == ["ReloadDhcp"]
    reload = actions[0]
    assert isinstance(reload, ReloadDhcp)
    assert (
        reload.hosts == "52:54:00:aa:00:01,10.50.0.10,web-prod\n52:54:00:aa:00:02,10.50.0.11,db\n"
    )
    assert reload.hosts_fingerprint == fingerprint(reload.hosts)


def test_a_new_gateway_restarts_dhcp() -> None:
    network = dataclasses.replace(NET, dhcp=dataclasses.replace(DHCP, gateway=None))
    actions = plan([network], realised())
    assert kinds(actions) == ["StartDhcp", "EnsurePort"]
    start = actions[0]
    assert isinstance(start, StartDhcp)
    assert start.restart
    assert not start.drift
    assert "dhcp-option=option:router\n" in start.config


def test_a_killed_dhcp_server_or_its_deleted_port_is_a_repair() -> None:
    observed = realised()
    dead = dataclasses.replace(
        observed, dhcp={42: dataclasses.replace(observed.dhcp[42], pid=None)}
    )
    actions = plan([NET], without(dead, "vfdh42"))
    assert kinds(actions) == ["StartDhcp", "EnsurePort"]
    assert repairs(actions) == [actions[0]]
    actions = plan([NET], without(observed, "vfdh42"))
    start = actions[0]
    assert isinstance(start, StartDhcp)
    assert start.restart
    assert start.drift


def test_dhcp_dropped_from_a_network_stops_its_server() -> None:
    network = dataclasses.replace(NET, dhcp=None)
    assert plan([network], realised()) == [
        StopDhcp("default/blue", 42, reason="the network has no DHCP any more")
    ]


def test_networks_no_longer_wanted_are_torn_down_first_and_others_left_alone() -> None:
    other = dataclasses.replace(NET, name="default/red", vni=7, taps=())
    observed = realised(other)
    links = {**observed.links, "vfbr0": ObservedLink("vfbr0", "bridge", 1500)}
    actions = plan([NET], dataclasses.replace(observed, links=links))
    assert actions[0] == RemoveNetwork(
        vni=7,
        links=("vfbr7", "vfdh7", "vfvx7"),
        dhcp=True,
        reason="no VM of this node is on the network of VNI 7 any more",
    )
    assert not any(isinstance(a, RemoveNetwork) for a in actions[1:])
    assert plan([], ObservedHost(links={"eth0": ObservedLink("eth0", "", 1500)})) == []


def test_dhcp_state_alone_is_torn_down_too() -> None:
    observed = ObservedHost(dhcp={9: ObservedDhcp(9, pid=None)})
    assert plan([], observed) == [
        RemoveNetwork(
            9, (), dhcp=True, reason="no VM of this node is on the network of VNI 9 any more"
        )
    ]


def test_two_networks_with_one_vni_and_vnis_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="share a VNI"):
        plan([NET, dataclasses.replace(NET, name="x")], ObservedHost())
    with pytest.raises(ValueError, match="VNI"):
        dataclasses.replace(NET, vni=2**24)


def test_the_dnsmasq_config_serves_known_macs_only_without_dns_or_a_lease_file() -> None:
    config = dnsmasq_config(NET)
    assert read_fingerprint(config) == fingerprint(config.partition("\n")[2])
    lines = config.splitlines()
    for expected in (
        "port=0",
        "interface=eth0",
        "leasefile-ro",
        "dhcp-authoritative",
        "dhcp-range=10.50.0.0,static,255.255.255.0,3600",
        "dhcp-option=option:router,10.50.0.1",
        "dhcp-option=option:dns-server",
        "dhcp-option=option:mtu,1450",
        "user=nobody",
    ):
        assert expected in lines
    assert "/" not in config.replace("default/blue", ""), "no paths: the same on every node"


def test_hostnames_are_single_labels() -> None:
    assert dhcp_hostname("Web.Prod_1") == "web-prod-1"
    assert dhcp_hostname("...") == ""
    assert dnsmasq_hosts(
        DhcpConfig("10.0.0.2", 24, leases=(Lease("AA:BB:CC:00:00:01", "10.0.0.5"),))
    ) == ("aa:bb:cc:00:00:01,10.0.0.5\n")


def test_nat_is_part_of_the_config_and_its_gateway_an_action_of_its_own() -> None:
    gateway = NatGateway("10.50.0.1", "169.254.64.44")
    network = dataclasses.replace(NET, dhcp=dataclasses.replace(DHCP, nat=gateway))
    config = dnsmasq_config(network)
    assert "# NAT gateway 10.50.0.1, uplink 169.254.64.44\n" in config
    # Turned on: the namespace is made again (the gateway's MAC goes on first), then the
    # gateway, after the DHCP port: a gateway that fails leaves DHCP serving.
    actions = plan([network], realised())
    assert kinds(actions) == ["StartDhcp", "EnsurePort", "PlugGateway"]
    start, _, plug = actions
    assert isinstance(start, StartDhcp)
    assert start.nat == gateway
    assert start.restart
    assert isinstance(plug, PlugGateway)
    assert (plug.nat, plug.prefix_length, plug.drift) == (gateway, 24, False)
    # Finished (up, and its alias says so): nothing to do.
    up = realised(network)
    done = ObservedLink("vfgw42", "veth", network.mtu, alias=gateway_done_alias(gateway))
    finished = dataclasses.replace(up, links={**up.links, "vfgw42": done})
    assert plan([network], finished) == []
    # Gone or down: a repair of the gateway alone; unfinished or for another uplink
    # address: made again, not a repair.
    for observed, drift in (
        (up, True),
        (changed(finished, "vfgw42", up=False), True),
        (changed(finished, "vfgw42", alias=""), False),
        (changed(finished, "vfgw42", alias="virtfleet NAT gateway 10.50.0.1 via x"), False),
    ):
        (again,) = plan([network], observed)
        assert isinstance(again, PlugGateway)
        assert again.drift is drift
    # A node that no longer has the network removes the uplink with the rest.
    (teardown,) = plan([], finished)
    assert isinstance(teardown, RemoveNetwork)
    assert "vfgw42" in teardown.links


def test_uplink_addresses_follow_the_vni_and_never_clash() -> None:
    first = uplink_addresses([7, 16388, 9])
    assert first == {7: "169.254.64.9", 9: "169.254.64.11", 16388: "169.254.64.10"}
    assert uplink_addresses([7]) == {7: "169.254.64.9"}
    assert len(set(uplink_addresses(range(1, 3000, 7)).values())) == len(range(1, 3000, 7))
