"""The raw-libvirt twin a benchmark compares with: the same domain, its own name and log."""

from __future__ import annotations

from bench.guests import raw_twin_xml

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import example_inputs, render_xml


def test_the_twin_writes_its_own_serial_log() -> None:
    spec = VirtualMachineSpec.model_validate(
        {"memory": {"size": "128Mi"}, "kernel": {"image": "vmlinuz", "cmdline": "console=ttyS0"}}
    )
    xml = render_xml(example_inputs(spec, namespace="ns", name="web"))
    assert "<log file=" in xml
    assert "ns_web" in xml
    twin = raw_twin_xml(xml, "raw-twin")
    assert "ns_web" not in twin  # name and serial log
    assert "raw-twin" in twin
    assert "<uuid>" not in twin
    assert "<metadata" not in twin  # no owner marker: no agent ever touches it
