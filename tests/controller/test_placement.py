"""Placement: every rule, spread, pins, selectors, capacity accounting and messages."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from tests.controller.fleet_builders import GI, NOW, host, node, request

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.reconcile.placement import (
    INSUFFICIENT_CAPACITY,
    UNSCHEDULABLE,
    Placement,
    Unschedulable,
    format_bytes,
    place,
)
from virtfleet.reconcile.views import HostView, NodeView, VmRequest

TIMEOUT = 40.0


def run(
    vm: VmRequest | VirtualMachineSpec,
    hosts: list[HostView],
    nodes: list[NodeView] | None = None,
    allocated: Mapping[str, int] | None = None,
    overcommit: float = 1.0,
) -> Placement | Unschedulable:
    nodes = nodes if nodes is not None else [node(h.name) for h in hosts]
    return place(
        vm,
        allocated or {},
        {h.name: h for h in hosts},
        {n.name: n for n in nodes},
        now=NOW,
        heartbeat_timeout=TIMEOUT,
        overcommit=overcommit,
    )


def unschedulable(result: Placement | Unschedulable) -> Unschedulable:
    assert isinstance(result, Unschedulable), result
    return result


def test_places_on_the_only_healthy_node() -> None:
    result = run(request("1Gi"), [host("node-a", 8)])
    assert result == Placement("node-a", 7 * GI)


def test_spread_picks_most_free_after_placement() -> None:
    hosts = [host("node-a", 8), host("node-b", 8)]
    result = run(request("1Gi"), hosts, allocated={"node-a": 2 * GI})
    assert isinstance(result, Placement)
    assert result.node == "node-b"


def test_ties_break_by_name() -> None:
    hosts = [host("node-b", 8), host("node-a", 8)]
    result = run(request("1Gi"), hosts)
    assert isinstance(result, Placement)
    assert result.node == "node-a"


def test_bigger_host_wins_when_empty() -> None:
    result = run(request("1Gi"), [host("node-a", 4), host("node-b", 16)])
    assert isinstance(result, Placement)
    assert result.node == "node-b"


def test_rapid_placements_account_for_each_other() -> None:
    """Feeding each result back into the allocation alternates the nodes (spread)."""
    hosts = [host("node-a", 8), host("node-b", 8)]
    allocated: dict[str, int] = {}
    chosen = []
    for _ in range(6):
        result = run(request("1Gi"), hosts, allocated=allocated)
        assert isinstance(result, Placement)
        chosen.append(result.node)
        allocated[result.node] = allocated.get(result.node, 0) + GI
    assert chosen == ["node-a", "node-b"] * 3


def test_capacity_runs_out() -> None:
    hosts = [host("node-a", 2), host("node-b", 2)]
    result = unschedulable(
        run(request("1.5Gi"), hosts, allocated={"node-a": GI, "node-b": int(1.8 * GI)})
    )
    assert result.reason == UNSCHEDULABLE
    assert not result.stalled
    assert result.message == (
        "0/2 nodes are available: node-a: 1Gi free < 1.5Gi requested; "
        "node-b: 204.8Mi free < 1.5Gi requested"
    )


def test_exact_fit_is_allowed() -> None:
    result = run(request("2Gi"), [host("node-a", 4)], allocated={"node-a": 2 * GI})
    assert result == Placement("node-a", 0)


def test_more_than_any_node_has_is_insufficient_capacity() -> None:
    hosts = [host("node-a", 8), host("node-b", 16)]
    result = unschedulable(run(request("1Ti"), hosts))
    assert result.reason == INSUFFICIENT_CAPACITY
    assert result.stalled
    assert "node-a: 8Gi total < 1Ti requested" in result.message
    assert "node-b: 16Gi total < 1Ti requested" in result.message


def test_overcommit_scales_capacity() -> None:
    assert isinstance(run(request("12Gi"), [host("node-a", 8)], overcommit=1.5), Placement)
    assert unschedulable(run(request("12Gi"), [host("node-a", 8)])).reason == (
        INSUFFICIENT_CAPACITY
    )


def test_pin_lands_on_its_node_even_if_another_has_more_room() -> None:
    hosts = [host("node-a", 4), host("node-b", 64)]
    result = run(request("1Gi", node_name="node-a"), hosts)
    assert isinstance(result, Placement)
    assert result.node == "node-a"


def test_pin_to_a_missing_node() -> None:
    result = unschedulable(run(request("1Gi", node_name="node-z"), [host("node-a")]))
    assert result.reason == UNSCHEDULABLE
    assert result.message == "pinned to node-z, which is not available: node-z: no such Node"


def test_pin_to_a_full_node_names_only_that_node() -> None:
    hosts = [host("node-a", 2), host("node-b", 64)]
    result = unschedulable(run(request("2Gi", node_name="node-a"), hosts, allocated={"node-a": GI}))
    assert result.message == (
        "pinned to node-a, which is not available: node-a: 1Gi free < 2Gi requested"
    )


def test_pin_to_a_node_too_small_is_stalled() -> None:
    result = unschedulable(run(request("4Gi", node_name="node-a"), [host("node-a", 2)]))
    assert result.reason == INSUFFICIENT_CAPACITY


def test_node_selector_matches_labels() -> None:
    hosts = [host("node-a", 64), host("node-b", 8)]
    nodes = [node("node-a"), node("node-b", disk="ssd")]
    result = run(request("1Gi", disk="ssd"), hosts, nodes)
    assert isinstance(result, Placement)
    assert result.node == "node-b"


def test_node_selector_nobody_matches() -> None:
    hosts = [host("node-a"), host("node-b")]
    nodes = [node("node-a", disk="hdd"), node("node-b")]
    result = unschedulable(run(request("1Gi", disk="ssd", zone="z1"), hosts, nodes))
    assert result.reason == UNSCHEDULABLE  # not stalled: someone may label a node
    assert result.message == (
        "0/2 nodes are available: node-a: does not match nodeSelector disk=ssd,zone=z1; "
        "node-b: does not match nodeSelector disk=ssd,zone=z1"
    )


def test_selector_mismatch_is_not_counted_as_capacity() -> None:
    """A huge VM that no node may take is Unschedulable, not InsufficientCapacity."""
    result = unschedulable(run(request("1Ti", disk="ssd"), [host("node-a")]))
    assert result.reason == UNSCHEDULABLE


@pytest.mark.parametrize(
    ("the_host", "phrase"),
    [
        (host("node-a", ready=False), "node-a: agent not Ready (LibvirtDown)"),
        (host("node-a", age=41), "node-a: agent heartbeat stale since 2026-01-01T11:59:19Z"),
        (host("node-a", heartbeat=False), "node-a: agent has not sent a heartbeat"),
        (host("node-a", memory_gi=None), "node-a: VMHost reports no memory yet"),
    ],
)
def test_unhealthy_agents_are_skipped(the_host: HostView, phrase: str) -> None:
    result = unschedulable(run(request("1Gi"), [the_host]))
    assert result.reason == UNSCHEDULABLE
    assert phrase in result.message


def test_heartbeat_exactly_at_the_timeout_is_fresh() -> None:
    assert isinstance(run(request("1Gi"), [host("node-a", age=TIMEOUT)]), Placement)


def test_nodes_without_vmhost_and_vmhosts_without_node() -> None:
    result = unschedulable(run(request("1Gi"), [host("ghost")], [node("node-a")]))
    assert "ghost: no such Node" in result.message
    assert "node-a: no VMHost (is the virtfleet agent running there?)" in result.message


def test_cordoned_nodes_take_nothing() -> None:
    result = unschedulable(run(request("1Gi"), [host("node-a")], [node("node-a", True)]))
    assert result.message == "0/1 nodes are available: node-a: cordoned"


def test_not_ready_big_node_still_counts_as_capacity() -> None:
    """A big node that is down may come back: that is waiting, not stalling."""
    hosts = [host("node-a", 2), host("node-b", 64, ready=False)]
    assert unschedulable(run(request("8Gi"), hosts)).reason == UNSCHEDULABLE


def test_empty_fleet() -> None:
    result = unschedulable(run(request("1Gi"), []))
    assert result.reason == UNSCHEDULABLE
    assert result.message == "no nodes"


def test_accepts_the_api_model() -> None:
    spec = VirtualMachineSpec.model_validate(
        {"memory": {"size": "2Gi"}, "nodeSelector": {"disk": "ssd"}}
    )
    hosts = [host("node-a"), host("node-b")]
    nodes = [node("node-a"), node("node-b", disk="ssd")]
    assert run(spec, hosts, nodes) == Placement("node-b", 6 * GI)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (-1, "0"),
        (512, "512B"),
        (2**20, "1Mi"),
        (int(1.25 * GI), "1.2Gi"),
        (4 * GI - 1, "3.9Gi"),
        (2**40, "1Ti"),
    ],
)
def test_format_bytes(value: int, text: str) -> None:
    assert format_bytes(value) == text
