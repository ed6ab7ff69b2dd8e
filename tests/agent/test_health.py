"""The liveness probe's staleness limit: configurable for tests, derived otherwise."""

from __future__ import annotations

import pytest

from virtfleet.agent import health
from virtfleet.agent.settings import AgentSettings


def test_stale_after_is_derived_from_the_heartbeat_with_a_floor() -> None:
    assert health.stale_after(AgentSettings("n", heartbeat_seconds=5)) == health.MIN_STALE_SECONDS
    assert health.stale_after(AgentSettings("n", heartbeat_seconds=20)) == 120


def test_configured_stale_seconds_win() -> None:
    assert health.stale_after(AgentSettings("n", watch_stale_seconds=15)) == 15


def test_echo_turns_unhealthy_once_stale_and_healthy_on_the_next_echo() -> None:
    now = [0.0]
    echo = health.WatchEcho(stale_after=15, clock=lambda: now[0])
    now[0] = 16
    with pytest.raises(health.Unhealthy, match="no VMHost echo yet"):
        echo.check()
    echo.seen()
    now[0] = 20
    assert echo.check() == 4


def test_watch_server_timeout_reaches_kopf_in_whole_seconds() -> None:
    from virtfleet.agent.handlers import kopf_settings

    assert kopf_settings(AgentSettings("n")).watching.server_timeout is None
    settings = kopf_settings(AgentSettings("n", watch_server_timeout=8.4))
    assert settings.watching.server_timeout == 8
