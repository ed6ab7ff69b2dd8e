"""The controller's tunables, in one documented, immutable place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerSettings:
    """How the controller paces itself and how generous placement is.

    Frozen so every part of a running controller sees the same values.
    """

    #: Seconds between placement retries of a VM that fits nowhere. VMHost and Node
    #: changes retry at once anyway; this catches what no event announces.
    retry_interval: float = 30.0
    #: Seconds between full passes over every cached VM (repairs what a lost event or
    #: a crash left behind; costs no API calls when nothing changed).
    resync_interval: float = 300.0
    #: A VMHost whose ``status.heartbeatTime`` is older than this is not trusted: no
    #: placements on it, and its VMs are marked ``Unknown``. Agents beat every ~10 s.
    heartbeat_timeout: float = 40.0
    #: How often heartbeats are checked for staleness (only the in-memory cache is read).
    heartbeat_check_interval: float = 5.0
    #: Namespace of the agents' heartbeat Leases (``virtfleet-agent-<node>``).
    lease_namespace: str = "kube-node-lease"
    #: How often the Leases are listed and node health judged (docs/failover.md).
    lease_poll_interval: float = 1.0
    #: Added to a node's own fencing time (self-fence + watchdog) before it is fenced.
    fence_margin: float = 2.0
    #: No placements on a node that is back from a failure for this long, doubled for
    #: each failure in the last 10 minutes (at most 10 minutes): a flapping node is damped.
    failure_damping: float = 30.0
    #: The longest such hold.
    failure_damping_max: float = 600.0
    #: Placeable memory = ``VMHost.status.memoryBytes * overcommit`` (1.0: none).
    overcommit: float = 1.0
    #: Concurrent reconciles. Placement decisions are serialised regardless, so that
    #: rapid placements see each other.
    workers: int = 4
    #: Migrations running out of one node at once (the rest wait in ``Pending``).
    max_migrations_per_node: int = 2
    #: Migrations running in the whole cluster at once.
    max_migrations_cluster: int = 5

    def __post_init__(self) -> None:
        for name in ("retry_interval", "resync_interval", "heartbeat_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.heartbeat_check_interval <= 0:
            raise ValueError("heartbeat_check_interval must be positive")
        if self.overcommit <= 0:
            raise ValueError("overcommit must be positive")
        for name in ("max_migrations_per_node", "max_migrations_cluster"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
