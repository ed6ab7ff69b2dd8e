"""Imperative actions build requests and objects; they never carry a spec of the VM."""

from __future__ import annotations

import pytest

from virtfleet.actions import migration_manifest, power_request_value, snapshot_manifest
from virtfleet.cli import build_parser
from virtfleet.reconcile.vm import PowerRequest


@pytest.mark.parametrize("action", ["start", "stop", "restart", "pause", "unpause"])
def test_power_requests_round_trip_through_the_agent_parser(action: str) -> None:
    value = power_request_value(action)
    parsed = PowerRequest.parse(value)
    assert parsed is not None
    assert parsed.action == action
    assert power_request_value(action) != value  # each invocation is a new request


def test_unknown_power_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown power action"):
        power_request_value("explode")


def test_power_subcommands_exist() -> None:
    args = build_parser().parse_args(["pause", "web", "-n", "shop"])
    assert (args.command, args.vm, args.namespace) == ("pause", "web", "shop")


def test_snapshot_and_migration_objects() -> None:
    snap = snapshot_manifest("web", "shop", memory=False)
    assert snap["spec"] == {"vmName": "web", "includeMemory": False}
    assert snap["metadata"]["generateName"].startswith("web-snap-")
    mig = migration_manifest("web", "shop", target_node="node-b")
    assert mig["spec"] == {"vmName": "web", "targetNode": "node-b"}
