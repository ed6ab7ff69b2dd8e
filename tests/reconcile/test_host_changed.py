"""Which VMHost updates the controller acts on: not a heartbeat that only moves time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from virtfleet.reconcile.views import HostView, host_changed

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
HOST = HostView(
    name="node-a",
    ready=True,
    ready_reason="AgentReady",
    heartbeat=NOW - timedelta(seconds=5),
    memory_bytes=2**34,
    resource_version="10",
)


def test_a_plain_heartbeat_is_no_change() -> None:
    beat = replace(HOST, heartbeat=NOW, resource_version="11")
    assert not host_changed(HOST, beat, NOW, 40.0)


def test_a_heartbeat_after_a_silence_is_a_change() -> None:
    silent = replace(HOST, heartbeat=NOW - timedelta(seconds=60))
    assert host_changed(silent, replace(HOST, heartbeat=NOW), NOW, 40.0)


def test_readiness_capacity_and_news_are_changes() -> None:
    assert host_changed(None, HOST, NOW, 40.0)
    assert host_changed(HOST, replace(HOST, ready=False, ready_reason="LibvirtDown"), NOW, 40.0)
    assert host_changed(HOST, replace(HOST, memory_bytes=2**33), NOW, 40.0)
    assert host_changed(HOST, replace(HOST, placeable_after=NOW), NOW, 40.0)
