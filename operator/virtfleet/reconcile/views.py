"""What the controller reads from VirtualMachine, VMHost and Node objects.

Raw bodies are reduced to small frozen views once, when they enter the controller's
cache, so the pure decision functions (placement, migration scheduling) take plain
values and tests build them without a cluster. Parsing is lenient: a field the
controller does not need never stops it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from virtfleet.api.conditions import ConditionStatus, ConditionType
from virtfleet.api.quantity import Quantity, QuantityError
from virtfleet.identity import NODE_LABEL, Key


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime; ``None`` when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object without what virtfleet never reads: ``managedFields`` and kubectl's copy.

    Together they are most of a small VM's size, and the agent's cache holds every VM of
    its node, the controller's every VM of the fleet.
    """
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**body, "metadata": meta}


@dataclass(frozen=True)
class VmRequest:
    """What placement needs from a VM's spec."""

    memory_bytes: int
    memory_text: str
    node_name: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    #: It has a ``type: network`` NIC: only nodes that realise VMNetworks can run it.
    needs_networks: bool = False


@dataclass(frozen=True)
class CachedVm:
    """One VirtualMachine in the controller's cache (the agent's is ``reconcile.vm.VmView``)."""

    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: str
    labels: Mapping[str, str]
    deleting: bool
    run_strategy: str
    #: ``spec.evictionStrategy``: what a cordon of the VM's node does (``None``/``LiveMigrate``).
    eviction_strategy: str
    #: ``None`` when the spec cannot be read (then ``spec_error`` says why).
    request: VmRequest | None
    spec_error: str | None
    status: Mapping[str, Any]
    body: Mapping[str, Any]

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def node_name(self) -> str | None:
        """Where the VM is placed: ``status.nodeName`` is the record (the label follows)."""
        node = self.status.get("nodeName")
        return node if isinstance(node, str) and node else None

    @property
    def node_label(self) -> str | None:
        return self.labels.get(NODE_LABEL)

    @property
    def memory_bytes(self) -> int:
        return self.request.memory_bytes if self.request else 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CachedVm:
        meta = body.get("metadata") or {}
        raw_spec = body.get("spec") or {}
        request, error = _request(raw_spec)
        spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
            resource_version=str(meta.get("resourceVersion") or ""),
            labels=dict(meta.get("labels") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
            run_strategy=str(spec.get("runStrategy") or "Always"),
            eviction_strategy=str(spec.get("evictionStrategy") or "None"),
            request=request,
            spec_error=error,
            status=dict(body.get("status") or {}),
            body=slim(body),
        )


def _request(spec: Any) -> tuple[VmRequest | None, str | None]:
    # The schema guarantees the shapes; a body that lacks them is refused, not a crash
    # of the watch handler (which would leave the VM out of the cache and silent).
    if not isinstance(spec, Mapping) or not isinstance(spec.get("memory") or {}, Mapping):
        return None, "spec.memory must be an object"
    size = (spec.get("memory") or {}).get("size")
    if size is None:
        return None, "spec.memory.size is missing"
    try:
        quantity = Quantity(size)
    except QuantityError as exc:
        return None, f"spec.memory.size: {exc}"
    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, Mapping):
        return None, "spec.nodeSelector must be a map of labels"
    pin = spec.get("nodeName")
    nics = spec.get("interfaces")
    return (
        VmRequest(
            memory_bytes=quantity.bytes,
            memory_text=quantity.text,
            node_name=str(pin) if pin else None,
            node_selector={str(k): str(v) for k, v in selector.items()},
            needs_networks=isinstance(nics, list)
            and any(isinstance(n, Mapping) and n.get("type") == "network" for n in nics),
        ),
        None,
    )


@dataclass(frozen=True)
class HostView:
    """One cached VMHost (written by the agent of the node with the same name)."""

    name: str
    ready: bool
    ready_reason: str
    heartbeat: datetime | None
    memory_bytes: int | None
    #: Pools the agent reports as shared by every node.
    shared_pools: frozenset[str] = frozenset()
    #: Damping after a failure (``status.health.placeableAfter``): no placements before.
    placeable_after: datetime | None = None
    #: From the node's Lease, when it has one (controller clock; see reconcile.node_health):
    #: when a renewal was last seen, and for how long one counts.
    lease_seen: datetime | None = None
    lease_duration: float | None = None
    #: The Lease carries a fence mark (the node is fenced or recovering from it).
    fenced: bool = False
    #: Its agent realises VMNetworks (it reports a tunnel address).
    realises_networks: bool = False
    #: Of the body it was made from: a late, older copy must not replace it.
    resource_version: str = ""

    def heartbeat_age(self, now: datetime) -> float | None:
        return None if self.heartbeat is None else (now - self.heartbeat).total_seconds()

    def silence_limit(self, timeout: float) -> float:
        """How long the agent may be silent: its Lease's duration, else ``timeout``."""
        if self.lease_seen is not None and self.lease_duration is not None:
            return self.lease_duration
        return timeout

    def fresh(self, now: datetime, timeout: float) -> bool:
        """The agent is alive: its Lease renewed in time (when it has one; a Lease says
        how long it counts), else its VMHost heartbeat within ``timeout``."""
        if self.fenced:
            return False
        if self.lease_seen is not None and self.lease_duration is not None:
            return (now - self.lease_seen).total_seconds() <= self.lease_duration
        age = self.heartbeat_age(now)
        return age is not None and age <= timeout

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> HostView:
        status = body.get("status") or {}
        ready = next(
            (
                c
                for c in status.get("conditions") or ()
                if isinstance(c, Mapping) and c.get("type") == ConditionType.READY
            ),
            None,
        )
        memory = status.get("memoryBytes")
        health = status.get("health") or {}
        return cls(
            name=str((body.get("metadata") or {}).get("name") or ""),
            resource_version=str((body.get("metadata") or {}).get("resourceVersion") or ""),
            ready=bool(ready and ready.get("status") == ConditionStatus.TRUE),
            ready_reason=str((ready or {}).get("reason") or "NoReadyCondition"),
            heartbeat=parse_time(status.get("heartbeatTime")),
            memory_bytes=int(memory) if isinstance(memory, int) and memory >= 0 else None,
            shared_pools=frozenset(
                str(p.get("name"))
                for p in status.get("pools") or ()
                if isinstance(p, Mapping) and p.get("shared")
            ),
            placeable_after=parse_time(health.get("placeableAfter"))
            if isinstance(health, Mapping)
            else None,
            realises_networks=bool(status.get("tunnelAddress")),
        )


@dataclass(frozen=True)
class NodeView:
    """One cached Node: its labels (for nodeSelector) and whether it is cordoned."""

    name: str
    labels: Mapping[str, str]
    unschedulable: bool = False
    #: The ``node.kubernetes.io/out-of-service`` taint: an admin says the node is down.
    out_of_service: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NodeView:
        meta = body.get("metadata") or {}
        return cls(
            name=str(meta.get("name") or ""),
            labels=dict(meta.get("labels") or {}),
            unschedulable=bool((body.get("spec") or {}).get("unschedulable")),
            out_of_service=any(
                isinstance(t, Mapping) and t.get("key") == "node.kubernetes.io/out-of-service"
                for t in (body.get("spec") or {}).get("taints") or ()
            ),
        )


def host_changed(old: HostView | None, new: HostView, now: datetime, timeout: float) -> bool:
    """Whether a VMHost update matters to placement or to its VMs' health.

    Every agent rewrites its VMHost at each heartbeat (every few seconds): at 20 nodes
    and 10,000 VMs, re-examining a node's VMs and the unplaced ones at each of them was
    most of the controller's work. A heartbeat that only moves ``heartbeatTime`` changes
    nothing: a heartbeat that *stops* is found by the controller's periodic check.
    """
    if old is None or old.fresh(now, timeout) != new.fresh(now, timeout):
        return True
    return _steady(old) != _steady(new)


def _steady(host: HostView) -> HostView:
    return replace(host, heartbeat=None, lease_seen=None, resource_version="")
