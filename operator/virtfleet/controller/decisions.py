"""What the controller writes into a VM's status: pure functions, no I/O.

The controller owns a VM's status only until its agent takes over, plus one override:

* unplaced: ``printableStatus: Scheduling`` and why it waits (``Ready=False`` with the
  placement reason; ``Stalled=True`` when waiting will not help, ``Reconciling=True``
  otherwise);
* just placed: ``nodeName``, and ``Starting`` (or ``Stopped`` for run strategies that
  do not start on their own) with ``Ready=False/WaitingForAgent`` — the controller has
  decided, nothing runs yet, and the agent overwrites all of it on its first pass;
* placed on a node whose agent went silent: ``Unknown`` with ``Ready=Unknown/NodeUnreachable``
  (the agent overwrites it when it comes back).

Each function returns the *whole* wanted status (the stored one with the controller's
fields changed); the caller writes only the difference (``runtime.status.status_patch``),
so fields owned by the agent are never rewritten and an unchanged decision writes nothing.
Messages are stable (no "N seconds ago") for the same reason.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from virtfleet.api.conditions import (
    ConditionStatus,
    ConditionType,
    kstatus_conditions,
    read_conditions,
    set_condition,
    write_conditions,
)
from virtfleet.api.virtualmachine import PrintableStatus, RunStrategy
from virtfleet.identity import NODE_LABEL, node_finalizer
from virtfleet.reconcile.placement import Placement, Unschedulable, stale_heartbeat
from virtfleet.reconcile.views import CachedVm, HostView

WAITING_FOR_AGENT = "WaitingForAgent"
NODE_UNREACHABLE = "NodeUnreachable"
SCHEDULED = "Scheduled"

#: Run strategies whose VM starts by itself once placed.
_STARTS = {RunStrategy.ALWAYS.value, RunStrategy.RERUN_ON_FAILURE.value, RunStrategy.ONCE.value}


@dataclass(frozen=True)
class Note:
    """A Kubernetes Event the controller records about a VM."""

    type: str  # Normal | Warning
    reason: str
    message: str


def scheduling_status(
    vm: CachedVm, outcome: Placement | Unschedulable, *, now: str | None = None
) -> dict[str, Any]:
    """The status of an unplaced VM after a placement attempt (see the module doc)."""
    status = copy.deepcopy(dict(vm.status))
    if isinstance(outcome, Placement):
        status["nodeName"] = outcome.node
        starts = vm.run_strategy in _STARTS
        status["printableStatus"] = (
            PrintableStatus.STARTING.value if starts else PrintableStatus.STOPPED.value
        )
        why = (WAITING_FOR_AGENT, f"placed on {outcome.node}; waiting for its agent")
        stalled = False
    else:
        status.pop("nodeName", None)
        status["printableStatus"] = PrintableStatus.SCHEDULING.value
        why = (outcome.reason, outcome.message)
        stalled = outcome.stalled
    conditions = kstatus_conditions(
        read_conditions(status),
        vm.generation,
        ready=(ConditionStatus.FALSE, *why),
        reconciling=None if stalled else why,
        stalled=why if stalled else None,
        now=now,
    )
    status["conditions"] = write_conditions(conditions)
    return status


def scheduling_note(
    old_status: Mapping[str, Any], outcome: Placement | Unschedulable
) -> Note | None:
    """An Event for a placement, or for a *new* reason not to place (not every retry)."""
    if isinstance(outcome, Placement):
        return Note("Normal", SCHEDULED, f"placed on {outcome.node}")
    ready = next((c for c in read_conditions(old_status) if c.type == ConditionType.READY), None)
    if ready is not None and ready.reason == outcome.reason:
        return None
    return Note("Warning", outcome.reason, outcome.message)


def unreachable_status(
    vm: CachedVm,
    host: HostView | None,
    *,
    now: datetime,
    heartbeat_timeout: float,
    timestamp: str | None = None,
) -> dict[str, Any] | None:
    """The status of a placed VM whose agent is silent; ``None`` while the agent is alive.

    ``None`` also means "leave it": the controller never marks a VM healthy again,
    that is the agent's word (it knows whether the domain survived).
    """
    node = vm.node_name
    if node is None:
        return None
    if host is not None and host.fresh(now, heartbeat_timeout):
        return None
    why = (
        "its VMHost does not exist"
        if host is None
        else f"{stale_heartbeat(host)} (timeout {host.silence_limit(heartbeat_timeout):g}s)"
    )
    message = f"node {node} is unreachable: {why}"
    status = copy.deepcopy(dict(vm.status))
    status["printableStatus"] = PrintableStatus.UNKNOWN.value
    conditions = set_condition(
        read_conditions(status),
        type=ConditionType.READY,
        status=ConditionStatus.UNKNOWN,
        reason=NODE_UNREACHABLE,
        message=message,
        observed_generation=vm.generation,
        now=timestamp,
    )
    status["conditions"] = write_conditions(conditions)
    return status


def unreachable_note(old_status: Mapping[str, Any], new_status: Mapping[str, Any]) -> Note | None:
    if old_status.get("printableStatus") == PrintableStatus.UNKNOWN.value:
        return None
    ready = next((c for c in read_conditions(new_status) if c.type == ConditionType.READY), None)
    return Note("Warning", NODE_UNREACHABLE, ready.message if ready else NODE_UNREACHABLE)


def placement_metadata(
    labels: Mapping[str, str], finalizers: Sequence[str], node: str
) -> dict[str, Any] | None:
    """The metadata merge patch that puts a placed VM on ``node``; None if it is there.

    At the first placement (no node label yet) the node agent's finalizer comes in the
    same write: the agent would add it as its first act anyway, so the VM costs one
    apiserver write less, and a VM deleted before its agent saw it still waits for the
    agent to clean up (as KubeVirt's VMIs wait for virt-handler). A relabel (the
    hand-over of a migration) leaves finalizers to the agents, which swap them.
    """
    if labels.get(NODE_LABEL) == node:
        return None
    metadata: dict[str, Any] = {"labels": {NODE_LABEL: node}}
    wanted = node_finalizer(node)
    if NODE_LABEL not in labels and wanted not in finalizers:
        metadata["finalizers"] = [*finalizers, wanted]
    return metadata
