"""Pure decisions of a VMMigration: scheduling, progress, and the end of the job.

No I/O here. The controller asks :func:`decide_schedule` where a migration goes (or why
it cannot go anywhere) and writes :func:`scheduled_status` / :func:`refused_status`;
the source node's agent turns ``jobStats()`` into :func:`progress_of` and decides with
:func:`should_publish` whether a status write is worth it, and with :func:`job_outcome`
whether a finished job succeeded — by where the domain is, not by the job type, which
reads ``NONE`` right after a job ended (DESIGN §6, Nova's ``libvirt/migration.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from virtfleet.api.conditions import ConditionStatus, rfc3339
from virtfleet.api.migration import (
    MigrationMode,
    MigrationPhase,
    MigrationProgress,
    VMMigrationSpec,
    VMMigrationStatus,
)
from virtfleet.controller.placement import Placement, Unschedulable, place
from virtfleet.controller.views import HostView, NodeView, VmRequest
from virtfleet.hypervisor.jobs import JobProgress
from virtfleet.reconcile.snapshot import MIGRATION_DONE_PHASES, _kstatus

#: Phases in which the source agent may still start, run or finish the job.
ACTIVE_PHASES = frozenset(p for p in MigrationPhase if p.value not in MIGRATION_DONE_PHASES)
#: Publish progress at most this often (each publication is one status PATCH).
PROGRESS_INTERVAL_SECONDS = 1.5


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

    The target passes the same rules as a first placement (:mod:`controller.placement`:
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
            "conditions": _kstatus(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, wait.reason, wait.message),
                reconciling=(wait.reason, wait.message),
                stalled=None,
                now=now,
            ),
        }
    )


# --- completion timeout ----------------------------------------------------------------

GIB = 2**30


def completion_budget(
    per_gib: int | None, memory_bytes: int, copied_disk_bytes: int
) -> float | None:
    """Seconds the job may take: ``completionTimeoutPerGiB * (RAM + copied disks) GiB``."""
    if per_gib is None:
        return None
    return per_gib * (memory_bytes + copied_disk_bytes) / GIB


def timed_out(budget: float | None, elapsed: float) -> bool:
    return budget is not None and elapsed > budget


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
            "conditions": _kstatus(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, "Scheduled", message),
                reconciling=("Scheduled", message),
                stalled=None,
                now=now,
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
            "conditions": _kstatus(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, reason, message),
                reconciling=None,
                stalled=(reason, message),
                now=now,
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
            "conditions": _kstatus(
                status.conditions,
                generation,
                ready=(ConditionStatus.FALSE, "Running", message),
                reconciling=("Running", message),
                stalled=None,
                now=now,
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
            "conditions": _kstatus(
                status.conditions,
                generation,
                ready=(ConditionStatus.TRUE, "Succeeded", message),
                reconciling=None,
                stalled=None,
                now=now,
            ),
        }
    )


def progress_of(job: JobProgress) -> MigrationProgress:
    """``status.progress`` from one ``jobStats()`` sample."""
    percent = job.percent
    return MigrationProgress(
        percent=None if percent is None else int(percent),
        data_total_bytes=job.data_total,
        data_processed_bytes=job.data_processed,
        data_remaining_bytes=job.data_remaining,
        dirty_rate_bytes_per_second=job.dirty_rate_bytes_per_second,
        iteration=job.memory_iteration,
    )


def should_publish(
    last: MigrationProgress | None,
    new: MigrationProgress,
    seconds_since_last: float,
    interval: float = PROGRESS_INTERVAL_SECONDS,
) -> bool:
    """Publish when something changed and the previous write is at least ``interval`` old."""
    if last == new:
        return False
    return last is None or seconds_since_last >= interval


@dataclass(frozen=True)
class DomainWhere:
    """Where the VM's domain is after a job ended (or after a restart found no job)."""

    on_source: bool
    source_active: bool
    on_target: bool
    target_active: bool
    #: The source is paused because its migration completed (reason ``migration``, not
    #: post-copy): QEMU stopped its vCPUs at the switch-over.
    source_paused_by_migration: bool = False
    #: The target's vCPUs run (not an incoming domain still paused).
    target_running: bool = False


def job_outcome(where: DomainWhere) -> str:
    """``succeeded`` | ``failed`` | ``unclear``, decided by where the domain runs.

    With ``UNDEFINE_SOURCE`` and ``PERSIST_DEST`` a finished migration leaves the domain
    running on the target only; an aborted or failed one leaves it running on the
    source. A source libvirtd that died between the switch-over and the confirmation
    leaves its copy paused (libvirt's ``perform3_done`` recovery waits for "a third
    party"): the target runs the guest, so that is a success too, and the paused
    left-over is the hand-over's to remove. Anything else (both, neither) is not safe
    to call either way.
    """
    if where.target_active and not where.source_active:
        return "succeeded"
    if where.target_running and where.source_paused_by_migration:
        return "succeeded"
    if where.source_active and not where.target_active:
        return "failed"
    return "unclear"


def offline_outcome(where: DomainWhere) -> str:
    """``succeeded`` | ``failed`` | ``unclear`` of an interrupted *offline* migration.

    The offline job defines the domain on the target only after every volume was
    copied, and undefines it here only after that: a definition on the target with
    nothing running here means the copy is complete (the source definition, if still
    there, is a left-over to undefine). No definition on the target means the job
    stopped before its end: the VM stays here (its VM loop starts it per run strategy).
    """
    if where.on_target and not where.source_active and not where.target_active:
        return "succeeded"
    if where.on_target and where.target_active and not where.source_active:
        return "succeeded"  # the target agent already started it
    if where.on_source and not where.on_target:
        return "failed"
    return "unclear"


# --- post-copy -----------------------------------------------------------------------

#: Pre-copy gets this many memory iterations before a stall can switch it to post-copy.
POSTCOPY_AFTER_ITERATION = 3


def postcopy_due(
    samples: Sequence[tuple[int, int]], *, after_iteration: int = POSTCOPY_AFTER_ITERATION
) -> bool:
    """Switch to post-copy now? ``samples`` are ``(iteration, memory remaining bytes)``
    from ``jobStats()`` in time order.

    The bytes left at the *start* of an iteration are what the guest dirtied during the
    previous one: pre-copy converges while that shrinks. It stalls when the current
    iteration is past ``after_iteration`` and its start is not smaller than the previous
    iteration's start. Iteration 0 (storage copy, before memory moves) never counts.
    """
    starts: dict[int, int] = {}
    for iteration, remaining in samples:
        if iteration > 0 and iteration not in starts:
            starts[iteration] = remaining
    if not starts:
        return False
    current = max(starts)
    if current <= after_iteration:
        return False
    earlier = [i for i in starts if i < current]
    if not earlier:
        return False
    return starts[current] >= starts[max(earlier)]


def postcopy_failure_message(error: str | None) -> str:
    """``Failed`` text of a job that broke after the switch to post-copy."""
    return (
        "the migration failed after switching to post-copy: the guest's memory is split "
        "between the source and the target, so the guest is lost; it is not restarted "
        f"on either node (delete this VMMigration to let the source node recover the VM). "
        f"libvirt: {error or 'unknown error'}"
    )


def handoff_printable(mode: MigrationMode) -> str:
    """What the VM reads right after the hand-over: a live one runs; an offline one is
    stopped until the target's VM loop starts it (per ``runStrategy``)."""
    return "Running" if mode is MigrationMode.LIVE else "Stopped"


__all__ = [
    "ACTIVE_PHASES",
    "EVICTION_LABEL",
    "GIB",
    "POSTCOPY_AFTER_ITERATION",
    "PROGRESS_INTERVAL_SECONDS",
    "SLOT_PHASES",
    "DomainWhere",
    "EvictionCandidate",
    "EvictionPlan",
    "MigrationRef",
    "Refused",
    "Scheduled",
    "VmFacts",
    "competing",
    "completion_budget",
    "decide_schedule",
    "eviction_name",
    "failed_status",
    "handoff_printable",
    "job_outcome",
    "offline_outcome",
    "plan_eviction",
    "postcopy_due",
    "postcopy_failure_message",
    "progress_of",
    "running_status",
    "scheduled_status",
    "should_publish",
    "slot_wait",
    "succeeded_status",
    "timed_out",
    "waiting_status",
]
