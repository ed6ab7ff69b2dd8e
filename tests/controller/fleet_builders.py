"""Builders of controller views for tests: a fleet without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from virtfleet.reconcile.views import CachedVm, HostView, NodeView, VmRequest

GI = 2**30
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def host(
    name: str,
    memory_gi: float | None = 8,
    *,
    ready: bool = True,
    age: float = 5,
    heartbeat: bool = True,
) -> HostView:
    return HostView(
        name=name,
        ready=ready,
        ready_reason="AgentReady" if ready else "LibvirtDown",
        heartbeat=NOW - timedelta(seconds=age) if heartbeat else None,
        memory_bytes=None if memory_gi is None else int(memory_gi * GI),
    )


def node(name: str, unschedulable: bool = False, **labels: str) -> NodeView:
    return NodeView(
        name=name, labels={"kubernetes.io/hostname": name, **labels}, unschedulable=unschedulable
    )


def request(memory: str = "1Gi", node_name: str | None = None, **selector: str) -> VmRequest:
    from virtfleet.api.quantity import Quantity

    return VmRequest(
        memory_bytes=Quantity(memory).bytes,
        memory_text=memory,
        node_name=node_name,
        node_selector=selector,
    )


def vm_body(
    name: str = "vm1",
    *,
    namespace: str = "ns",
    memory: str = "1Gi",
    status: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    generation: int = 3,
    resource_version: str = "100",
    run_strategy: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": generation,
            "resourceVersion": resource_version,
            "labels": labels or {},
        },
        "spec": {"memory": {"size": memory}, **spec},
        "status": status or {},
    }
    if run_strategy:
        body["spec"]["runStrategy"] = run_strategy
    return body


def vm(**kwargs: Any) -> CachedVm:
    return CachedVm.from_body(vm_body(**kwargs))
