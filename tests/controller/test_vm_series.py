"""The controller's per-VM series, written by hand, are what prometheus_client writes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from virtfleet.controller.metrics import INFO_HELP, READY_HELP, render_vm_series
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.views import CachedVm


def vm(name: str, node: str | None, status: dict[str, Any]) -> CachedVm:
    labels = {NODE_LABEL: node} if node else {}
    meta = {"namespace": "ns", "name": name, "uid": name, "labels": labels}
    return CachedVm.from_body(
        {"metadata": meta, "spec": {"memory": {"size": "64Mi"}}, "status": status}
    )


VMS = [
    vm(
        "web",
        "node-a",
        {"printableStatus": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    ),
    vm('odd"\\name', None, {}),
    vm("db", "node-b", {"printableStatus": "Stopped"}),
]


class Reference(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "virtfleet_vm_info", INFO_HELP, labels=["namespace", "name", "node", "phase"]
        )
        ready = GaugeMetricFamily(
            "virtfleet_vm_ready", READY_HELP, labels=["namespace", "name", "node"]
        )
        for one in VMS:
            node = one.labels.get(NODE_LABEL, "")
            phase = str(one.status.get("printableStatus") or "Pending")
            info.add_metric([one.namespace, one.name, node, phase], 1)
            up = any(c.get("status") == "True" for c in one.status.get("conditions", []))
            ready.add_metric([one.namespace, one.name, node], 1 if up else 0)
        yield info
        yield ready


def test_vm_series_are_byte_for_byte_prometheus_clients() -> None:
    registry = CollectorRegistry()
    registry.register(Reference())
    assert render_vm_series(VMS) == generate_latest(registry)
