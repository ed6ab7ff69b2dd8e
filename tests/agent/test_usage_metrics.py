"""The usage text the agent renders itself is what prometheus_client would write."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from virtfleet.agent.usage_metrics import USAGE_FAMILIES, VmUsage, render_usage
from virtfleet.domain.stats import BlockUsage, DomainUsage, NetUsage

NODE = "node-a"

SNAPSHOT = [
    VmUsage(
        "ns",
        "web",
        DomainUsage(
            cpu_seconds=12.5,
            cpu_user_seconds=10.0,
            cpu_system_seconds=2.25,
            vcpus=2,
            memory_domain_bytes=1 << 30,
            memory_resident_bytes=123_456_789_012,  # Go's exponent form
            blocks=(BlockUsage("root", read_bytes=4096, write_seconds=0.5), BlockUsage("data")),
            nets=(NetUsage("lan", receive_bytes=10, transmit_drops=3),),
        ),
    ),
    VmUsage("other", 'odd"name\\', DomainUsage(cpu_seconds=0.0)),  # escaping, sparse usage
    VmUsage("ns", "empty", DomainUsage()),
]


class Reference(Collector):
    """The same families through prometheus_client's own types."""

    def collect(self) -> Iterator[Metric]:
        for family in USAGE_FAMILIES:
            labels = ["namespace", "name", "node"] + ([family.device] if family.device else [])
            kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = kind(family.name, family.doc, labels=labels)
            for vm in SNAPSHOT:
                base = [vm.namespace, vm.name, NODE]
                if not family.device:
                    value = getattr(vm.usage, family.field)
                    if value is not None:
                        metric.add_metric(base, value)
                    continue
                devices = vm.usage.blocks if family.device == "drive" else vm.usage.nets
                for device in devices:
                    metric.add_metric([*base, device.name], getattr(device, family.field))
            yield metric


def test_rendered_text_is_byte_for_byte_prometheus_clients() -> None:
    registry = CollectorRegistry()
    registry.register(Reference())
    assert render_usage(SNAPSHOT, NODE) == generate_latest(registry)


def test_rendered_text_parses_with_the_values_given() -> None:
    parsed = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(render_usage(SNAPSHOT, NODE).decode())
        for sample in family.samples
    }
    web = (("name", "web"), ("namespace", "ns"), ("node", NODE))
    assert parsed[("virtfleet_vm_cpu_usage_seconds_total", web)] == 12.5
    assert parsed[("virtfleet_vm_memory_resident_bytes", web)] == 123_456_789_012
    drive = tuple(sorted((*web, ("drive", "root"))))
    assert parsed[("virtfleet_vm_storage_read_traffic_bytes_total", drive)] == 4096
    odd = (("name", 'odd"name\\'), ("namespace", "other"), ("node", NODE))
    assert parsed[("virtfleet_vm_cpu_usage_seconds_total", odd)] == 0.0
    assert not any(
        name == "virtfleet_vm_vcpus" and ("name", "empty") in labels for name, labels in parsed
    )


def test_no_vm_still_declares_every_family() -> None:
    text = render_usage([], NODE).decode()
    assert text.count("# TYPE ") == len(USAGE_FAMILIES)
    assert not [line for line in text.splitlines() if not line.startswith("#")]
