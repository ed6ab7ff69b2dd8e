"""Pure decisions of a VMMigration before and after its job: scheduling, slots, statuses.

No I/O here. The controller asks :func:`decide_schedule` where a migration goes (or why
it cannot go anywhere), plans drains with :func:`plan_eviction`, and writes
:func:`scheduled_status`; the source agent writes :func:`running_status`,
:func:`succeeded_status` and :func:`failed_status`. What happens while the job runs and
how it ends is :mod:`virtfleet.reconcile.migration_job`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from virtfleet.api.conditions import ConditionStatus, kstatus_conditions, rfc3339
from virtfleet.api.migration import (
    MigrationPhase,
    MigrationProgress,
    VMMigrationSpec,
    VMMigrationStatus,
)
from virtfleet.reconcile.placement import Placement, Unschedulable, place
from virtfleet.reconcile.snapshot_migration import MIGRATION_DONE_PHASES
from virtfleet.reconcile.views import HostView, NodeView, VmRequest

#: Phases in which the source agent may still start, run or finish the job.
ACTIVE_PHASES = frozenset(p for p in MigrationPhase if p.value not in MIGRATION_DONE_PHASES)


@dataclass(frozen=True)
class MigrationRef:
    """Another VMMigration of the same VM, as far as the one-at-a-time rule needs it."""

    name: str
    created: datetime
    phase: MigrationPhase | None


@dataclass(frozen=True)
class VmFacts:
    """What scheduling needs from the VM being migrated."""

    name: str
    node: str | None
    request: VmRequest | None
    deleting: bool = False


@dataclass(frozen=True)
class Scheduled:
    source: str
    target: str


@dataclass(frozen=True)
class Refused:
    reason: str
    message: str


def _order(ref: MigrationRef) -> tuple[datetime, str]:
    return ref.created, ref.name


def competing(me: MigrationRef, others: Sequence[MigrationRef]) -> list[str]:
    """Other active migrations of the VM that come first: one migration per VM at a time.

    One that the controller has already scheduled (or that runs) always comes first;
    among unscheduled ones, the oldest (then the name) wins, so two migrations created at
    once never both go.
    """
    ahead = []
    for other in others:
        if other.name == me.name or (other.phase and other.phase.value in MIGRATION_DONE_PHASES):
            continue
        if other.phase not in (None, MigrationPhase.PENDING) or _order(other) < _order(me):
            ahead.append(other.name)
    return sorted(ahead)


def decide_schedule(
    spec: VMMigrationSpec,
    vm: VmFacts | None,
    ahead: Sequence[str],
    vms_on_nodes: Mapping[str, int],
    hosts: Mapping[str, HostView],
    nodes: Mapping[str, NodeView],
    *,
    now: datetime,
    heartbeat_timeout: float,
    overcommit: float = 1.0,
) -> Scheduled | Refused:
    """Where the migration goes, or why it goes nowhere (then it is ``Failed``, for good).

    The target passes the same rules as a first placement (:mod:`virtfleet.reconcile.placement`:
    Node exists and is not cordoned, ``nodeSelector``, live agent, free memory), but the
    source node is never a candidate and ``spec.nodeName`` is replaced by the
    migration's ``targetNode``.
    """
    if vm is None:
        return Refused("VMNotFound", f"VirtualMachine {spec.vm_name!r} does not exist")
    if vm.deleting:
        return Refused("VMDeleting", f"VirtualMachine {vm.name!r} is being deleted")
    if vm.node is None:
        return Refused("VMNotPlaced", f"VirtualMachine {vm.name!r} is not placed on a node")
    if vm.request is None:
        return Refused("InvalidSpec", f"VirtualMachine {vm.name!r} has an unreadable spec")
    if ahead:
        return Refused(
            "MigrationInProgress",
            f"another migration of VirtualMachine {vm.name!r} is active: {', '.join(ahead)}",
        )
    if spec.target_node == vm.node:
        return Refused("TargetIsSource", f"the VM already runs on {vm.node}")
    request = replace(vm.request, node_name=spec.target_node)
    candidates = {k: v for k, v in nodes.items() if k != vm.node}
    outcome: Placement | Unschedulable = place(
        request,
        vms_on_nodes,
        {k: v for k, v in hosts.items() if k != vm.node},
        candidates,
        now=now,
        heartbeat_timeout=heartbeat_timeout,
        overcommit=overcommit,
    )
    if isinstance(outcome, Unschedulable):
        reason = "NoTarget" if spec.target_node is None else "TargetUnsuitable"
        return Refused(reason, outcome.message)
    return Scheduled(source=vm.node, target=outcome.node)


# --- node drain ----------------------------------------------------------------------

#: Label on the VMMigrations a drain created: the cordoned node's name.
EVICTION_LABEL = "virtfleet.io/eviction"
_MAX_NAME = 253


def eviction_name(vm: str, node: str) -> str:
    """``<vm>-evict-<node>``: deterministic, so a restarted controller finds its own.

    Too long for a name (253) → shortened with a hash of the full name, still unique.
    """
    name = f"{vm}-evict-{node}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: _MAX_NAME - 11].rstrip('-.')}-{digest}"


@dataclass(frozen=True)
class EvictionCandidate:
    """A VM on a cordoned node, as far as the drain decision needs it."""

    name: str
    strategy: str
    printable: str | None
    deleting: bool = False


@dataclass(frozen=True)
class EvictionPlan:
    migrate: tuple[str, ...]
    #: VMs that stay: ``evictionStrategy: None`` (reported, never touched).
    report: tuple[str, ...]


def plan_eviction(vms: Sequence[EvictionCandidate]) -> EvictionPlan:
    """Which VMs of a cordoned node get a ``LiveMigrate`` VMMigration, which are reported.

    Only running VMs migrate live; a stopped one has nothing to move (and a VM in any
    other state is looked at again when its status changes). Deleting ones are skipped.
    """
    migrate, report = [], []
    for vm in vms:
        if vm.deleting:
            continue
        if vm.strategy != "LiveMigrate":
            report.append(vm.name)
        elif vm.printable == "Running":
            migrate.append(vm.name)
    return EvictionPlan(tuple(sorted(migrate)), tuple(sorted(report)))


# --- parallelism limits ----------------------------------------------------------------

#: Phases that hold a slot: the controller committed a source and a target.
SLOT_PHASES = frozenset(
    {MigrationPhase.SCHEDULED, MigrationPhase.PREPARING_TARGET, MigrationPhase.RUNNING}
)


def slot_wait(
    source: str,
    active: Mapping[str, str],
    *,
    per_node: int,
    per_cluster: int,
) -> Refused | None:
    """Why a migration out of ``source`` must wait, or ``None`` when a slot is free.

    ``active`` maps every other migration that holds a slot (:data:`SLOT_PHASES`) to
    its source node.
    """
    if len(active) >= per_cluster:
        return Refused(
            "ClusterLimitReached",
            f"{len(active)} migrations run in the cluster (limit {per_cluster}); waiting",
        )
    out_of_source = sum(1 for node in active.values() if node == source)
    if out_of_source >= per_node:
        return Refused(
            "NodeLimitReached",
            f"{out_of_source} migrations run out of {source} (limit {per_node}); waiting",
        )
    return None


def waiting_status(
    status: VMMigrationStatus, generation: int, wait: Refused, now: datetime
) -> VMMigrationStatus:
    """``Pending`` with the reason it waits (not stalled: it starts when a slot frees)."""
    return status.model_copy(
        update={
            "observed_generation": generation,
            "phase": MigrationPhase.PENDING,
            "conditions": kstatus_conditions(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, wait.reason, wait.message),
                reconciling=(wait.reason, wait.message),
                stalled=None,
                now=rfc3339(now),
            ),
        }
    )


def scheduled_status(
    status: VMMigrationStatus, generation: int, outcome: Scheduled, now: datetime
) -> VMMigrationStatus:
    message = f"scheduled from {outcome.source} to {outcome.target}"
    return status.model_copy(
        update={
            "observed_generation": generation,
            "phase": MigrationPhase.SCHEDULED,
            "source_node": outcome.source,
            "target_node": outcome.target,
            "conditions": kstatus_conditions(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, "Scheduled", message),
                reconciling=("Scheduled", message),
                stalled=None,
                now=rfc3339(now),
            ),
        }
    )


def failed_status(
    status: VMMigrationStatus,
    generation: int,
    reason: str,
    message: str,
    now: datetime,
    *,
    phase: MigrationPhase = MigrationPhase.FAILED,
) -> VMMigrationStatus:
    """``Failed`` (or ``Cancelled``) for good: ``Stalled`` with the reason, and why."""
    return status.model_copy(
        update={
            "observed_generation": generation,
            "phase": phase,
            "failure_reason": f"{reason}: {message}",
            "completion_time": status.completion_time or rfc3339(now),
            "conditions": kstatus_conditions(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, reason, message),
                reconciling=None,
                stalled=(reason, message),
                now=rfc3339(now),
            ),
        }
    )


def running_status(status: VMMigrationStatus, generation: int, now: datetime) -> VMMigrationStatus:
    """The commitment the source agent stores (compare-and-swap) before it starts the job."""
    message = f"migrating from {status.source_node} to {status.target_node}"
    return status.model_copy(
        update={
            "observed_generation": generation,
            "phase": MigrationPhase.RUNNING,
            "start_time": status.start_time or rfc3339(now),
            "conditions": kstatus_conditions(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, "Running", message),
                reconciling=("Running", message),
                stalled=None,
                now=rfc3339(now),
            ),
        }
    )


def succeeded_status(
    status: VMMigrationStatus, generation: int, downtime_ms: int | None, now: datetime
) -> VMMigrationStatus:
    message = f"the VM runs on {status.target_node}"
    progress = (status.progress or MigrationProgress()).model_copy(
        update={"percent": 100, "data_remaining_bytes": 0}
    )
    return status.model_copy(
        update={
            "observed_generation": generation,
            "phase": MigrationPhase.SUCCEEDED,
            "completion_time": status.completion_time or rfc3339(now),
            "downtime_ms": downtime_ms,
            "progress": progress,
            "conditions": kstatus_conditions(
                status.conditions,
                generation,
                ready=(ConditionStatus.TRUE, "Succeeded", message),
                reconciling=None,
                stalled=None,
                now=rfc3339(now),
            ),
        }
    )


__all__ = [
    "ACTIVE_PHASES",
    "EVICTION_LABEL",
    "SLOT_PHASES",
    "EvictionCandidate",
    "EvictionPlan",
    "MigrationRef",
    "Refused",
    "Scheduled",
    "VmFacts",
    "competing",
    "decide_schedule",
    "eviction_name",
    "failed_status",
    "plan_eviction",
    "running_status",
    "scheduled_status",
    "slot_wait",
    "succeeded_status",
    "waiting_status",
]
