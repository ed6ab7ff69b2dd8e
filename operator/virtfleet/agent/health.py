"""The node agent's liveness: fail on a dead libvirt connection or a deaf watch.

kopf serves ``GET <liveness endpoint>`` by running every ``@kopf.on.probe`` handler (at
most once per 10 s) and answers 500 when one fails. kopf's own endpoint alone only says
"the event loop answers"; it does not notice a watch that stopped delivering (kopf #1276)
nor a libvirtd that died under the agent. Two probes close that gap:

* ``libvirt`` asks libvirtd for its version, with a timeout, through the agent's own
  connection when the agent is reachable (:func:`register` with ``agent=``), otherwise
  through a short read-only connection of its own;
* ``watch`` is a self-echo: the agent renews its ``VMHost`` every ``heartbeat_seconds``,
  and a watch on its own VMHost must deliver that change back. When no echo arrived for
  ``stale_after`` seconds, either the heartbeat or the watch stream is stuck — a restart
  (what the kubelet does on a failed liveness probe) fixes both. ``--watch-stale-seconds``
  sets that limit (the e2e tests use a short one).

Wiring without touching :mod:`virtfleet.agent.handlers`: :func:`run` builds the agent's
registry, adds these probes and starts kopf with ``liveness_endpoint``; the CLI calls it
for ``virtfleet agent --liveness URL``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from virtfleet.agent.settings import AgentSettings
from virtfleet.hypervisor.hostinfo import libvirt_version_via_new_connection, version_string
from virtfleet.identity import API_GROUP, API_VERSION

#: Seconds one libvirt probe may take before it counts as dead.
LIBVIRT_TIMEOUT = 5.0
#: The echo may be late by this many heartbeats before the watch counts as deaf.
STALE_HEARTBEATS = 6
MIN_STALE_SECONDS = 60.0


class Unhealthy(kopf.PermanentError):
    """A failed probe: kopf's endpoint answers 500 and the kubelet restarts the agent."""


@dataclass
class WatchEcho:
    """When this node's VMHost was last seen through the watch (monotonic seconds)."""

    stale_after: float
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    last: float | None = None

    def __post_init__(self) -> None:
        self.started = self.clock()

    def seen(self) -> None:
        self.last = self.clock()

    def check(self) -> float:
        """Seconds since the last echo; raises :class:`Unhealthy` once it is stale."""
        now = self.clock()
        age = now - (self.last if self.last is not None else self.started)
        if age > self.stale_after:
            what = "no VMHost echo yet" if self.last is None else "VMHost echo is stale"
            raise Unhealthy(
                f"{what}: {age:.0f}s > {self.stale_after:.0f}s (heartbeat or watch stuck)"
            )
        return age


def stale_after(settings: AgentSettings) -> float:
    """The configured staleness, else a margin of heartbeats generous enough for a busy node."""
    if settings.watch_stale_seconds is not None:
        return settings.watch_stale_seconds
    return max(MIN_STALE_SECONDS, STALE_HEARTBEATS * settings.heartbeat_seconds)


def register(
    registry: kopf.OperatorRegistry,
    settings: AgentSettings,
    agent: Callable[[], Any | None] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> WatchEcho:
    """Add the ``libvirt`` and ``watch`` probes (and the VMHost echo watch) to ``registry``.

    ``agent`` returns the running :class:`virtfleet.agent.agent.Agent` (or None before
    start-up); with it the libvirt probe uses the agent's own connection.
    """
    echo = WatchEcho(stale_after=stale_after(settings), clock=clock)
    node = settings.node_name

    def own_host(name: str, **_: Any) -> bool:
        return name == node

    @kopf.on.event(API_GROUP, API_VERSION, "vmhosts", when=own_host, registry=registry)
    def _echo(**_: Any) -> None:
        echo.seen()

    @kopf.on.probe(id="libvirt", registry=registry)
    async def _libvirt(**_: Any) -> str:
        the_agent = agent() if agent is not None else None
        try:
            if the_agent is not None:
                if not the_agent.hv.connected:
                    raise Unhealthy(f"libvirt at {settings.libvirt_uri} is disconnected")
                version = await asyncio.wait_for(the_agent.hv.libvirt_version(), LIBVIRT_TIMEOUT)
            else:
                version = await asyncio.wait_for(
                    libvirt_version_via_new_connection(settings.libvirt_uri), LIBVIRT_TIMEOUT
                )
        except Unhealthy:
            raise
        except Exception as exc:  # libvirtError, TimeoutError, ...
            raise Unhealthy(f"libvirt at {settings.libvirt_uri} does not answer: {exc}") from exc
        return f"libvirt {version_string(version)}"

    @kopf.on.probe(id="watch", registry=registry)
    def _watch(**_: Any) -> str:
        return f"VMHost echo {echo.check():.0f}s ago"

    return echo
