"""Cross-field rules and defaults of the spec models."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from virtfleet.api.migration import VMMigrationSpec
from virtfleet.api.snapshot import VMSnapshotSpec
from virtfleet.api.virtualmachine import RunStrategy, VirtualMachineSpec


def vm(**spec: Any) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate({"memory": {"size": "128Mi"}, **spec})


def refused(message: str, **spec: Any) -> None:
    with pytest.raises(ValidationError, match=message):
        vm(**spec)


def test_defaults_match_kubevirt_expectations() -> None:
    spec = vm()
    assert spec.run_strategy is RunStrategy.ALWAYS
    assert spec.cpu.vcpus == 1
    assert spec.termination_grace_period_seconds == 30
    assert spec.memory.size.bytes == 128 * 2**20


def test_wire_names_are_camel_case() -> None:
    spec = vm(runStrategy="Halted", terminationGracePeriodSeconds=5)
    wire = spec.to_wire()
    assert wire["runStrategy"] == "Halted"
    assert wire["terminationGracePeriodSeconds"] == 5


@pytest.mark.parametrize(
    "source",
    [
        {},
        {"image": "a", "blank": {}},
        {"image": "a", "http": {"url": "http://x", "sha256": "0" * 64}},
    ],
)
def test_disk_needs_exactly_one_source(source: dict[str, Any]) -> None:
    refused(
        "exactly one of image, blank, http or backup",
        disks=[{"name": "d", "size": "1Gi", "source": source}],
    )


def test_blank_disk_needs_size() -> None:
    refused("a blank disk needs a size", disks=[{"name": "d", "source": {"blank": {}}}])


def test_memory_minimum() -> None:
    refused("at least 16Mi", memory={"size": "15Mi"})
    assert vm(memory={"size": "16Mi"}).memory.size.mebibytes == 16


def test_vcpu_limit() -> None:
    refused("at most 512", cpu={"cores": 64, "sockets": 4, "threads": 4})


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden", "a/b", "a..b", ""])
def test_image_names_cannot_escape_the_store(name: str) -> None:
    with pytest.raises(ValidationError):
        vm(disks=[{"name": "d", "source": {"image": name}}])
    with pytest.raises(ValidationError):
        vm(kernel={"image": name})


@pytest.mark.parametrize("name", ["Root", "-a", "a_b", "a" * 64, ""])
def test_disk_names_are_dns_labels(name: str) -> None:
    with pytest.raises(ValidationError):
        vm(disks=[{"name": name, "size": "1Gi", "source": {"blank": {}}}])


def test_unique_names_boot_orders_and_macs() -> None:
    blank = {"size": "1Gi", "source": {"blank": {}}}
    refused("disk names must be unique", disks=[{"name": "a", **blank}, {"name": "a", **blank}])
    refused(
        "bootOrder values must be unique",
        disks=[{"name": "a", "bootOrder": 1, **blank}, {"name": "b", "bootOrder": 1, **blank}],
    )
    refused("interface names must be unique", interfaces=[{"name": "a"}, {"name": "a"}])
    refused(
        "macAddress values must be unique",
        interfaces=[
            {"name": "a", "macAddress": "02:00:00:00:00:01"},
            {"name": "b", "macAddress": "02:00:00:00:00:01".upper()},
        ],
    )


def test_interface_type_rules() -> None:
    refused("bridge is required", interfaces=[{"name": "a", "type": "bridge"}])
    refused("bridge is required", interfaces=[{"name": "a", "bridge": "br0"}])
    refused("network is required", interfaces=[{"name": "a", "type": "network"}])
    refused("unicast", interfaces=[{"name": "a", "macAddress": "03:00:00:00:00:01"}])
    ok = vm(interfaces=[{"name": "a", "type": "bridge", "bridge": "br0"}])
    assert ok.interfaces[0].bridge == "br0"


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        vm(runStrategyy="Always")


def test_models_are_immutable() -> None:
    spec = vm()
    with pytest.raises(ValidationError):
        spec.run_strategy = RunStrategy.HALTED  # type: ignore[misc]


def test_snapshot_and_migration_specs() -> None:
    snap = VMSnapshotSpec.model_validate({"vmName": "demo", "failureDeadline": "5m"})
    assert snap.include_memory is None
    with pytest.raises(ValidationError, match="postCopy only applies"):
        VMMigrationSpec.model_validate(
            {"vmName": "demo", "mode": "Offline", "policy": {"postCopy": True}}
        )
    mig = VMMigrationSpec.model_validate({"vmName": "demo", "policy": {"bandwidthMiBps": 10}})
    assert mig.policy.bandwidth_mibps == 10
    assert mig.to_wire()["policy"]["bandwidthMiBps"] == 10
