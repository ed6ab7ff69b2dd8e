"""What happens to a VM whose node is fenced: its ``spec.highAvailability`` decides. Pure;
the controller places the VM and writes what :func:`failover_status` returns.

* ``None`` (default): the VM stays ``Unknown`` on its node until the node returns.
* ``Restart``: every writable disk must be in a shared pool; the VM is placed on another
  node (nodeSelector, capacity, as any placement) and its agent starts it from the same
  disks. A VM that fits nowhere waits, saying why.
* ``RestoreFromBackup``: the latest completed VMBackup of this VM (same uid) is restored on
  another node: the new node's agent makes each backed-up disk from it (the VM's
  ``status.failover.backupName``) instead of from ``spec``. What was written after that
  backup is lost: the backup's age is the RPO, shown in status.

The run strategy keeps its meaning on the new node: a ``Halted``, ``Manual`` or ``Once``
VM is placed there but not started by the move.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from virtfleet.api.conditions import (
    ConditionStatus,
    read_conditions,
    rfc3339,
    set_condition,
    write_conditions,
)
from virtfleet.api.virtualmachine import HighAvailability, PrintableStatus, VirtualMachineSpec
from virtfleet.reconcile.views import parse_time

FAILED_OVER = "FailedOver"
FAILOVER_CONDITION = "FailedOver"


def failed_over_from(vm: Mapping[str, Any], node: str) -> str | None:
    """The node the VM now lives on, if it failed over away from ``node``; else None."""
    status = vm.get("status") or {}
    failover = status.get("failover") or {}
    placed = status.get("nodeName")
    if failover.get("fromNode") != node or not placed or placed == node:
        return None
    return str(placed)


@dataclass(frozen=True)
class BackupRef:
    name: str
    completed: datetime


@dataclass(frozen=True)
class Plan:
    """The VM may fail over: with this policy (and backup)."""

    policy: HighAvailability
    backup: BackupRef | None = None


@dataclass(frozen=True)
class Stay:
    """The VM does not fail over (now): why."""

    reason: str
    message: str
    #: Waiting cannot help (a spec change can): ``Stalled``.
    stalled: bool = False


def plan_failover(
    spec: VirtualMachineSpec | None,
    shared_pools: Collection[str],
    default_pool: str | None,
    backups: Iterable[BackupRef],
    *,
    spec_seen_by_node: bool = True,
    migrating: bool = False,
) -> Plan | Stay:
    """Whether (and how) a VM on a fenced node fails over.

    ``spec_seen_by_node``: the policy the node's agent last reported acting on
    (``status.highAvailability``) is the spec's. The node self-fences HA VMs only: a VM
    made HA while its node was cut off may still run there. ``migrating``: a VMMigration
    of it is running (its target may hold a copy only the migration's recovery can judge).
    """
    if spec is None:
        return Stay("InvalidSpec", "the spec cannot be read: no failover", stalled=True)
    policy = spec.high_availability
    if policy is HighAvailability.NONE:
        return Stay(
            "NoHighAvailability",
            "spec.highAvailability is None: the VM stays until its node returns",
            stalled=True,
        )
    if not spec_seen_by_node:
        return Stay(
            "SpecNotObserved",
            "the node's agent had not seen the VM's highAvailability policy when the node "
            "went silent (it may not have stopped it): the VM stays until the node returns",
            stalled=True,
        )
    if migrating:
        return Stay(
            "MigrationInProgress",
            "a VMMigration of the VM is not finished: no failover until it is",
        )
    if policy is HighAvailability.RESTART:
        local = [
            f"{d.name} ({d.pool or default_pool or 'the default pool'})"
            for d in spec.disks
            if not d.read_only and (d.pool or default_pool) not in shared_pools
        ]
        if local:
            return Stay(
                "DisksNotShared",
                "highAvailability Restart needs every writable disk in a shared pool "
                f"({', '.join(sorted(shared_pools)) or 'none is configured'}); node-local: "
                f"{', '.join(local)}. Use RestoreFromBackup for node-local disks",
                stalled=True,
            )
        return Plan(policy)
    latest = max(backups, key=lambda b: b.completed, default=None)
    if latest is None:
        return Stay(
            "NoBackup",
            "highAvailability RestoreFromBackup: the VM has no completed VMBackup to restore",
        )
    return Plan(policy, latest)


def latest_backups(vm_uid: str, backups: Iterable[Mapping[str, Any]]) -> list[BackupRef]:
    """Completed VMBackups of the VM with this uid (not being deleted)."""
    out = []
    for body in backups:
        status = body.get("status") or {}
        if status.get("phase") != "Completed" or status.get("vmUID") != vm_uid:
            continue
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            continue
        completed = parse_time(status.get("completionTime"))
        if completed is not None:
            out.append(BackupRef(str(body["metadata"]["name"]), completed))
    return out


def failover_status(
    status: Mapping[str, Any],
    generation: int,
    plan: Plan,
    *,
    from_node: str,
    to_node: str,
    reason: str,
    now: datetime,
    timestamp: str,
) -> dict[str, Any]:
    """The VM's status once placed on ``to_node`` (written with a compare-and-swap)."""
    out = copy.deepcopy(dict(status))
    previous = out.get("failover") or {}
    failover: dict[str, Any] = {
        "count": int(previous.get("count") or 0) + 1,
        "fromNode": from_node,
        "toNode": to_node,
        "time": timestamp,
        "policy": plan.policy.value,
        "reason": reason,
    }
    message = f"moved from failed node {from_node} to {to_node} ({plan.policy.value}): {reason}"
    if plan.backup is not None:
        rpo = max(0, int((now - plan.backup.completed).total_seconds()))
        failover.update(
            backupName=plan.backup.name,
            backupTime=rfc3339(plan.backup.completed),
            rpoSeconds=rpo,
        )
        message += f"; restored from VMBackup {plan.backup.name}, {rpo}s old (RPO)"
    out["failover"] = failover
    out["nodeName"] = to_node
    out["printableStatus"] = PrintableStatus.STARTING.value
    conditions = set_condition(
        read_conditions(out),
        type=FAILOVER_CONDITION,
        status=ConditionStatus.TRUE,
        reason=FAILED_OVER,
        message=message,
        observed_generation=generation,
        now=timestamp,
    )
    conditions = set_condition(
        conditions,
        type="Ready",
        status=ConditionStatus.FALSE,
        reason="WaitingForAgent",
        message=f"failed over to {to_node}; waiting for its agent",
        observed_generation=generation,
        now=timestamp,
    )
    out["conditions"] = write_conditions(conditions)
    return out


def failover_message(status: Mapping[str, Any]) -> str:
    failover = status.get("failover") or {}
    for c in status.get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == FAILOVER_CONDITION:
            return str(c.get("message") or "")
    return f"moved from {failover.get('fromNode')} to {failover.get('toNode')}"
