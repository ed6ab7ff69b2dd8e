"""What the agent keeps per object, counted: a leak is a count that never returns to 0.

Every structure the agent keeps per VM, VMSnapshot, VMRestore or VMMigration — caches,
work-queue state, finalization events, per-VM locks, Event aggregation locks — is
counted here, and the agent logs the counts (``agent bookkeeping``) whenever they
changed, looked at with each heartbeat. On a node without VMs, snapshots, restores and
migrations every count in :data:`PER_OBJECT` is 0; the churn test checks exactly that
after its last round, which finds a per-object leak long before it shows in the RSS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from virtfleet.logs import get_logger

Counts = dict[str, int]

#: Counts that are 0 once the objects they are kept for are gone (the others are
#: bounded caches, e.g. ``events_aggregated``).
PER_OBJECT = frozenset(
    {
        "vms",
        "vm_uids",
        "vm_finalized",
        "vm_unplaced",
        "vm_observations",
        "vm_queue",
        "vm_locks",
        "snapshots",
        "snapshot_finalized",
        "snapshot_queue",
        "restores",
        "restore_queue",
        "migrations",
        "migration_queue",
        "migration_jobs",
        "migration_waits",
        "migration_network_waits",
        "network_incoming",
        "guest_agent_reports",
        "frozen_guests",
        "metrics_devices",
        "migration_samples",
        "event_locks",
    }
)


#: Caches of every such object in the cluster, not only of this node's: 0 only when the
#: cluster has none.
CLUSTER_WIDE = frozenset({"snapshots", "restores", "migrations"})


def rss_mib() -> float | None:
    """This process's resident set size (``VmRSS``), None where /proc has no such line."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class BookkeepingLog:
    """Logs the counts when they differ from the last ones logged (one line, not a stream)."""

    def __init__(self, count: Callable[[], Mapping[str, int]], node: str) -> None:
        self.count = count
        self.last: Counts | None = None
        self.log = get_logger("virtfleet.agent.bookkeeping", node=node)

    def check(self) -> Counts:
        counts = dict(self.count())
        if counts != self.last:
            self.last = counts
            self.log.info("agent bookkeeping", counts=counts, rss_mib=rss_mib())
        return counts
