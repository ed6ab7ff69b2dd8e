"""The controller's half of fencing: is a node Healthy, Failed, Fenced or Recovering, and
when may it fence it. Pure; ``controller.nodes`` acts on it (docs/failover.md).

* **Failed**: the node's Lease was not renewed for ``leaseDurationSeconds`` (measured on
  the controller's clock from when it *saw* the last renewal, so clocks need not agree).
  Its VMs are ``Unknown``; nothing moves yet.
* **Fenced**: the controller wrote a fence mark into the Lease (compare-and-swap: it loses
  to a renewal). It does so at ``seen + selfFenceAfter + watchdogTimeout + margin``, when
  the node's own guarantees (``reconcile.node_fencing``) say no HA VM runs there, or at
  once when an admin says the node is down (the ``node.kubernetes.io/out-of-service``
  taint, Kubernetes' own word for it). A node that declares no watchdog is never fenced
  automatically: its VMs wait for that taint. Its HA VMs fail over.
* **Recovering**: the agent renews again. The controller stops moving its VMs and clears
  the mark; the agent then finds its stale copies. Placements on the node wait a while
  (damping: 30 s, doubled for each failure in the last 10 minutes, at most 10 minutes),
  so a flapping node does not attract VMs it will drop again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from virtfleet.api.conditions import rfc3339
from virtfleet.api.vmhost import NodeHealth, NodeHealthState
from virtfleet.reconcile.node_fencing import (
    FENCED_ANNOTATION,
    SELF_FENCE_ANNOTATION,
    WATCHDOG_ANNOTATION,
)
from virtfleet.reconcile.views import parse_time

OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"
LEASE_PREFIX = "virtfleet-agent-"


@dataclass(frozen=True)
class HealthSettings:
    #: Added to the node's own fencing time before the controller fences it.
    fence_margin: float = 2.0
    #: First hold on placements after a node recovers; doubled per failure in the window.
    damping_base: float = 30.0
    damping_max: float = 600.0
    damping_window: float = 600.0


@dataclass(frozen=True)
class FenceMark:
    """What the controller writes into the Lease's ``virtfleet.io/fenced`` annotation."""

    time: datetime
    renew_time: str | None  # the renewal it fenced after: another one means "agent back"
    reason: str

    def encode(self) -> str:
        return json.dumps(
            {"time": rfc3339(self.time), "renewTime": self.renew_time, "reason": self.reason},
            sort_keys=True,
        )

    @classmethod
    def decode(cls, raw: str | None) -> FenceMark | None:
        if not raw:
            return None
        try:
            data = json.loads(raw)
            moment = parse_time(data.get("time"))
        except (ValueError, AttributeError):
            moment = None
            data = {}
        if moment is None:  # unreadable, yet a mark: treat it as one, made long ago
            return cls(datetime(1970, 1, 1, tzinfo=UTC), None, str(raw)[:200])
        return cls(moment, data.get("renewTime"), str(data.get("reason") or "fenced"))


def _seconds(raw: object) -> float | None:
    try:
        return float(str(raw)) if raw is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class LeaseView:
    """One agent's Lease as the controller saw it."""

    node: str
    resource_version: str
    renew_time: str | None
    #: Controller clock: when this renewTime was first seen.
    seen: datetime
    duration: float
    self_fence_after: float | None
    watchdog_timeout: float | None
    mark: FenceMark | None

    @classmethod
    def from_body(
        cls, body: Mapping[str, Any], now: datetime, previous: LeaseView | None
    ) -> LeaseView | None:
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if not name.startswith(LEASE_PREFIX):
            return None
        spec = body.get("spec") or {}
        annotations = meta.get("annotations") or {}
        renew = spec.get("renewTime")
        renew = str(renew) if renew else None
        seen = previous.seen if previous is not None and previous.renew_time == renew else now
        return cls(
            node=name[len(LEASE_PREFIX) :],
            resource_version=str(meta.get("resourceVersion") or ""),
            renew_time=renew,
            seen=seen,
            duration=float(spec.get("leaseDurationSeconds") or 10),
            self_fence_after=_seconds(annotations.get(SELF_FENCE_ANNOTATION)),
            watchdog_timeout=_seconds(annotations.get(WATCHDOG_ANNOTATION)),
            mark=FenceMark.decode(annotations.get(FENCED_ANNOTATION)),
        )

    def fresh(self, now: datetime) -> bool:
        return (now - self.seen).total_seconds() <= self.duration

    @property
    def back_after_fence(self) -> bool:
        """Renewed since the fence mark was written: the agent is alive again."""
        return self.mark is not None and self.renew_time != self.mark.renew_time

    def fence_deadline(self, settings: HealthSettings) -> datetime | None:
        if self.self_fence_after is None or self.watchdog_timeout is None:
            return None
        wait = self.self_fence_after + self.watchdog_timeout + settings.fence_margin
        return self.seen + timedelta(seconds=max(wait, self.duration))


@dataclass(frozen=True)
class NodeMemory:
    """What the controller remembers of a node between passes (seeded from VMHost health)."""

    failures: tuple[datetime, ...] = ()
    placeable_after: datetime | None = None
    state: NodeHealthState | None = None
    since: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    state: NodeHealthState
    reason: str
    message: str
    #: Write a fence mark now (compare-and-swap on the Lease).
    fence: FenceMark | None = None
    #: The agent is back after a fence: clear the mark (no VM is moved any more).
    clear_mark: bool = False
    #: Look again after this many seconds (a deadline), if any.
    recheck_after: float | None = None
    events: tuple[tuple[str, str, str], ...] = field(default=())


#: A node silent longer than this is just dead: it does not make a later failure of
#: another node look like a cluster-wide outage.
DISRUPTION_WINDOW_SECONDS = 300.0


def disrupted(leases: list[LeaseView], now: datetime) -> bool:
    """More than half of the nodes went silent at about the same time (and more than
    one): more likely the control plane or the network than the nodes (Kubernetes' node
    lifecycle controller stops evicting then too). No node is fenced automatically
    meanwhile. ``leases``: those of nodes that exist (a Node object)."""
    recent = [
        lease
        for lease in leases
        if (now - lease.seen).total_seconds() <= DISRUPTION_WINDOW_SECONDS or lease.mark is not None
    ]
    silent = sum(1 for lease in recent if lease.mark is None and not lease.fresh(now))
    return silent > 1 and silent * 2 > len(recent)


def judge(
    lease: LeaseView,
    now: datetime,
    *,
    out_of_service: bool,
    memory: NodeMemory,
    settings: HealthSettings,
    disruption: bool = False,
) -> Verdict:
    """The node's state now, and what the controller should do about it."""
    node = lease.node
    if lease.mark is not None and not lease.back_after_fence:
        return Verdict(
            NodeHealthState.FENCED,
            "Fenced",
            f"{node} is fenced ({lease.mark.reason}); its HA VMs fail over",
        )
    if lease.mark is not None and lease.fresh(now):
        return Verdict(
            NodeHealthState.RECOVERING,
            "AgentBack",
            f"the agent of {node} renews its Lease again after the fence; its stale "
            "copies are being removed",
            clear_mark=True,
        )
    # No mark, or a mark the agent renewed after and then went silent again before it
    # was cleared: a new failure, fenced anew (a new mark) at its own deadline.
    if lease.fresh(now):
        if memory.placeable_after is not None and now < memory.placeable_after:
            return Verdict(
                NodeHealthState.RECOVERING,
                "Damped",
                f"{node} failed {len(memory.failures)} time(s) in the last "
                f"{settings.damping_window:g}s: no placements until "
                f"{rfc3339(memory.placeable_after)}",
                recheck_after=(memory.placeable_after - now).total_seconds(),
            )
        return Verdict(
            NodeHealthState.HEALTHY, "LeaseRenewed", f"the agent of {node} renews its Lease"
        )
    stale = f"its Lease was last renewed at {rfc3339(lease.seen)} (duration {lease.duration:g}s)"
    if out_of_service:
        reason = f"the Node has the {OUT_OF_SERVICE_TAINT} taint and {stale}"
        return Verdict(
            NodeHealthState.FAILED,
            "OutOfService",
            f"{node} failed: {reason}",
            fence=FenceMark(now, lease.renew_time, reason),
        )
    deadline = lease.fence_deadline(settings)
    if disruption:
        return Verdict(
            NodeHealthState.FAILED,
            "ClusterDisruption",
            f"{node} failed: {stale}; but more than half of the nodes are silent at once "
            "(a control-plane or network outage is likelier): no node is fenced "
            "automatically until most of them renew again",
        )
    if deadline is None:
        return Verdict(
            NodeHealthState.FAILED,
            "NoFencing",
            f"{node} failed: {stale}. It declares no watchdog, so it cannot be fenced "
            f"automatically: its VMs wait. Once it is powered off, taint its Node "
            f"{OUT_OF_SERVICE_TAINT}=nodeshutdown:NoExecute to fail them over",
        )
    if now >= deadline:
        reason = (
            f"{stale}; its agent self-fences after {lease.self_fence_after:g}s and its "
            f"watchdog resets it {lease.watchdog_timeout:g}s after the last pet"
        )
        return Verdict(
            NodeHealthState.FAILED,
            "FenceDeadlinePassed",
            f"{node} failed: {reason}",
            fence=FenceMark(now, lease.renew_time, f"watchdog deadline passed: {reason}"),
        )
    return Verdict(
        NodeHealthState.FAILED,
        "LeaseExpired",
        f"{node} failed: {stale}; it counts as fenced at {rfc3339(deadline)}",
        recheck_after=(deadline - now).total_seconds(),
    )


def after_fence(memory: NodeMemory, now: datetime, settings: HealthSettings) -> NodeMemory:
    window = timedelta(seconds=settings.damping_window)
    failures = (*(t for t in memory.failures if now - t <= window), now)
    return NodeMemory(failures, memory.placeable_after, memory.state, memory.since)


def after_recovery(memory: NodeMemory, now: datetime, settings: HealthSettings) -> NodeMemory:
    count = max(1, len(memory.failures))
    hold = min(settings.damping_max, settings.damping_base * 2 ** (count - 1))
    return NodeMemory(memory.failures, now + timedelta(seconds=hold), memory.state, memory.since)


def health_status(verdict: Verdict, memory: NodeMemory, since: datetime) -> NodeHealth:
    return NodeHealth(
        state=verdict.state,
        reason=verdict.reason,
        message=verdict.message,
        since=rfc3339(since),
        failures=len(memory.failures),
        placeable_after=(
            rfc3339(memory.placeable_after) if memory.placeable_after is not None else None
        ),
    )
