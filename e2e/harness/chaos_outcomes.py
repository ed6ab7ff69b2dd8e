"""How the chaos workload's snapshots, restores and migrations ended: progress, not only safety.

The invariants (:mod:`harness.chaos_invariants`) prove that nothing went wrong, and they
hold just as well when nothing was done at all. Nor can the objects' final phases tell:
a VM's snapshots and restores are garbage-collected with it (ownerReferences), so most
are gone by the end. An :class:`Observer` lists them every ``OBSERVE_S`` seconds and keeps
what each said last; :func:`tally` then sorts every object the workload asked for into

* ``succeeded``: Ready (snapshot), Succeeded (restore, migration);
* ``refused``: the operator's answer by design to a request that cannot be done
  (:data:`REFUSALS`: the VM is being deleted, another migration of it runs...), or the
  object went (or waits) with its VM, deleted less than ``VM_GRACE_S`` (a migration:
  ``MIGRATION_GRACE_S``) after the request;
* ``failed``: any other Failed (a fault hit it: ``Interrupted``, libvirt errors...), and
  what its VM's deletion found still undone ``VM_GRACE_S`` after it was asked;
* ``unfinished``: in no final phase at the end (the invariants fail on those anyway),

separately for what was asked while faults were injected and for what was asked in the
quiet period after the last fault (``Request.quiet``), where everything that is not
refused by design must succeed; :data:`FLOOR` says how much of it at least.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harness.chaos import Request, Workload
from harness.chaos_invariants import objects
from harness.testing import Cluster, condition

KINDS = ("vmsnapshot", "vmrestore", "vmmigration")
OBSERVE_S = 2.0
SUCCESS = {"vmsnapshot": "Ready", "vmrestore": "Succeeded", "vmmigration": "Succeeded"}
#: Failure reasons that are the operator refusing a request by design, not a fault's
#: doing (reconcile/snapshot.py, reconcile/restore.py, agent/migration/checks.py).
REFUSALS = {
    "vmsnapshot": frozenset({"VMDeleting", "VMReplaced", "InvalidSpec", "VMNotFound"}),
    "vmrestore": frozenset(
        {
            "VMDeleting",
            "RestoreInProgress",
            "MigrationInProgress",
            "SnapshotNotFound",
            "SnapshotOfAnotherVM",
            "SnapshotDeleting",
            "SnapshotNotReady",
            "InvalidSpec",
            "VMNotFound",
        }
    ),
    "vmmigration": frozenset(
        {
            "VMNotFound",
            "VMDeleting",
            "VMNotPlaced",
            "InvalidSpec",
            "InvalidVMSpec",
            "MigrationInProgress",
            "TargetIsSource",
            "VMNotOnSource",
            "VMNotDefined",
            "VMNotRunning",
            "SnapshotsBlockMigration",
        }
    ),
}
#: Share of the requests not refused by design that must succeed, per period.
#: ``quiet`` (asked after the last fault was repaired): not 1.0, because libvirt 9 can
#: keep a job of a domain a killed libvirtd was working on, which the chaos test's
#: "operator" only clears by restarting libvirtd 45 s later (StuckJobOperator); a
#: request on that domain meanwhile may fail. ``chaos``: a request whose libvirt job
#: dies with its agent or libvirtd ends Failed by design (a migration ``Interrupted``,
#: a revert that cannot tell whether it happened), one at a time, every few seconds:
#: half of them succeeding is the least a working system does (measured: 18 of 19
#: migrations, all snapshots and restores, seed 41417).
FLOOR = {
    "quiet": {"vmsnapshot": 0.8, "vmrestore": 0.8, "vmmigration": 0.8},
    "chaos": {"vmsnapshot": 0.5, "vmrestore": 0.5, "vmmigration": 0.5},
}
#: Refusals because the VM is (being) deleted: by design only when that came soon.
VM_GONE = frozenset({"VMDeleting", "VMNotFound"})
#: A request whose VM the workload deleted sooner than this after asking had no fair
#: chance; one still undone after it had (a snapshot takes < 1 s here, a restore < 2 s,
#: an agent comes back within ~5 s of a kill). Counting every request that went with its
#: VM as refused once let a run in which no snapshot was ever taken pass.
VM_GRACE_S = 20.0
#: A migration's fair chance is longer: it needs both agents and the apiserver at once,
#: and the workload waits up to 60 s for an apiserver that was killed. With 20 s, seed
#: 1282817680 (180 s) counted two migrations whose VMs went 20-60 s later as failures
#: and fell below the floor (4 of 10).
MIGRATION_GRACE_S = 60.0
#: Fewer requests of a kind than this: too few for a share, at least one must work.
MIN_FOR_FLOOR = 4


@dataclass(eq=False)  # a Thread must stay hashable
class Observer(threading.Thread):
    """Keeps the last state seen of every snapshot, restore and migration of the namespace."""

    cluster: Cluster
    namespace: str
    stop: threading.Event = field(default_factory=threading.Event)
    last: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    gone: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="chaos-observer", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(OBSERVE_S):
            self.look()

    def look(self) -> bool:
        """One listing (False while the apiserver is away); also called once at the end."""
        try:
            found = objects(self.cluster, self.namespace)
        except Exception:  # the apiserver is down (chaos): the next look sees the state
            return False
        seen = set()
        for kind in KINDS:
            for name, obj in found[kind].items():
                self.last[(kind, name)] = obj
                seen.add((kind, name))
        self.gone = {key for key in self.last if key not in seen}
        return True


@dataclass
class Outcome:
    request: Request
    outcome: str
    """``succeeded``, ``refused``, ``failed`` or ``unfinished``."""
    reason: str


def outcome_of(
    request: Request, obj: dict[str, Any] | None, gone: bool, vm_deleted_at: float | None
) -> Outcome:
    kind = request.kind
    grace = MIGRATION_GRACE_S if kind == "vmmigration" else VM_GRACE_S
    early = vm_deleted_at is not None and vm_deleted_at - request.at < grace
    undone = "refused" if early else "failed"
    if obj is None:
        return Outcome(request, undone, "never seen (its VM went)")
    status = obj.get("status") or {}
    phase = status.get("phase")
    reason = str((condition(obj, "Ready") or {}).get("reason") or phase or "no status")
    if phase == SUCCESS[kind]:
        if kind == "vmrestore":  # a memory revert is what the guest's uptime can show
            memory = status.get("memoryRestored")
            return Outcome(request, "succeeded", "memory" if memory else "disks")
        return Outcome(request, "succeeded", phase)
    if phase in ("Failed", "Cancelled") and reason in VM_GONE:
        return Outcome(request, undone, reason)  # refused because its VM went: when?
    if phase in ("Failed", "Cancelled"):
        refused = reason in REFUSALS[kind] or phase == "Cancelled"
        return Outcome(request, "refused" if refused else "failed", reason)
    if (gone or reason == "VMNotFound") and vm_deleted_at is not None:
        return Outcome(request, undone, f"went with its VM ({reason})")
    return Outcome(request, "unfinished", reason)


def tally(workload: Workload, observer: Observer) -> list[Outcome]:
    """The outcome of every request (call after the observer's last look)."""
    return [
        outcome_of(
            request,
            observer.last.get((request.kind, request.name)),
            (request.kind, request.name) in observer.gone,
            workload.vms[request.vm].deleted_at if request.vm in workload.vms else None,
        )
        for request in workload.requests
    ]


def summary(outcomes: list[Outcome]) -> list[str]:
    """One line per kind and period: counts per outcome, by what was asked, with reasons."""
    lines = []
    for quiet in (False, True):
        for kind in KINDS:
            mine = [o for o in outcomes if o.request.kind == kind and o.request.quiet is quiet]
            counts = Counter(o.outcome for o in mine)
            reasons = Counter(f"{o.outcome}:{o.reason}" for o in mine)
            details = Counter(f"{o.request.detail}:{o.outcome}" for o in mine)
            lines.append(
                f"{'quiet' if quiet else 'chaos'} {kind}: {len(mine)} asked, "
                f"{dict(sorted(counts.items()))}; as asked {dict(sorted(details.items()))}; "
                f"as ended {dict(reasons.most_common())}"
            )
    return lines


def below_floor(outcomes: list[Outcome]) -> list[str]:
    """Kinds whose requests (not refused by design) succeeded too rarely, per period."""
    problems = []
    for period, floors in FLOOR.items():
        for kind, floor in floors.items():
            judged = [
                o
                for o in outcomes
                if o.request.kind == kind
                and o.request.quiet is (period == "quiet")
                and o.outcome != "refused"
            ]
            if not judged:
                continue
            succeeded = sum(1 for o in judged if o.outcome == "succeeded")
            needed = 1 if len(judged) < MIN_FOR_FLOOR else int(floor * len(judged))
            if succeeded < needed:
                others = Counter(
                    f"{o.outcome}:{o.reason}" for o in judged if o.outcome != "succeeded"
                )
                problems.append(
                    f"{period} {kind}: {succeeded}/{len(judged)} requests succeeded, need "
                    f"{needed} ({floor:.0%}); the others: {dict(others)}"
                )
    return problems
