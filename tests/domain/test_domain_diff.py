"""Diff: which fields changed, under which spec path, and live or restart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import Apply, DomainInputs, ObservedDomain, build_domain, diff, observe
from virtfleet.domain.config import BandwidthConfig, BandwidthLimit, IoTuneConfig
from virtfleet.domain.diff import machine_matches
from virtfleet.domain.observe import observe_config

InputsFactory = Callable[..., DomainInputs]
SpecFactory = Callable[..., VirtualMachineSpec]

BASE: dict[str, Any] = {
    "memory": {"size": "512Mi"},
    "cpu": {"cores": 2},
    "machine": "q35",
    "disks": [
        {"name": "root", "source": {"image": "img"}, "bootOrder": 1},
        {"name": "data", "size": "1Gi", "source": {"blank": {}}},
    ],
    "kernel": {"image": "vmlinuz", "cmdline": "console=ttyS0"},
    "interfaces": [
        {"name": "lan", "type": "bridge", "bridge": "br0"},
        {"name": "nat"},
    ],
}


@pytest.fixture
def observed_base(make_inputs: InputsFactory, make_spec: SpecFactory) -> ObservedDomain:
    return observe(build_domain(make_inputs(make_spec(**BASE))).to_xml())


def changed(make_inputs: InputsFactory, make_spec: SpecFactory, **fields: Any) -> Any:
    return build_domain(make_inputs(make_spec(**{**BASE, **fields})))


def test_no_change_no_diff(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    result = diff(changed(make_inputs, make_spec), observed_base)
    assert not result
    assert not result.needs_restart
    assert result.changes == result.live == result.restart == ()


@pytest.mark.parametrize(
    ("fields", "paths"),
    [
        ({"memory": {"size": "1Gi"}}, ["memory.size"]),
        ({"cpu": {"cores": 4}}, ["cpu.cores"]),
        ({"cpu": {"cores": 1, "sockets": 2}}, ["cpu.sockets", "cpu.cores"]),
        ({"cpu": {"cores": 1, "threads": 2}}, ["cpu.cores", "cpu.threads"]),
        ({"cpu": {"cores": 2, "model": "host-model"}}, ["cpu.model"]),
        ({"machine": "pc"}, ["machine"]),
        ({"firmware": {"type": "uefi"}}, ["firmware.type"]),
        ({"kernel": {"image": "other"}}, ["kernel.image", "kernel.cmdline"]),
        (
            {"kernel": {"image": "vmlinuz", "initrd": "i", "cmdline": "console=ttyS0"}},
            ["kernel.initrd"],
        ),
        ({"kernel": {"image": "vmlinuz", "cmdline": "quiet"}}, ["kernel.cmdline"]),
        ({"cloudInit": {"userData": "#cloud-config"}}, ["cloudInit"]),
        ({"disks": BASE["disks"][:1]}, ["disks[data]"]),
        (
            {"disks": [*BASE["disks"], {"name": "more", "size": "1Gi", "source": {"blank": {}}}]},
            ["disks[more]"],
        ),
        (
            {"disks": [{**BASE["disks"][0], "bus": "scsi"}, BASE["disks"][1]]},
            ["disks[root].bus", "disks[data].target"],
        ),
        (
            {"disks": [BASE["disks"][1], BASE["disks"][0]]},
            ["disks[data].target", "disks[root].target"],
        ),
        (
            {"disks": [{**BASE["disks"][0], "pool": "fast"}, BASE["disks"][1]]},
            ["disks[root].source"],
        ),
        (
            {"disks": [{**BASE["disks"][0], "readOnly": True}, BASE["disks"][1]]},
            ["disks[root].readOnly"],
        ),
        (
            {"disks": [{**BASE["disks"][0], "bootOrder": 3}, BASE["disks"][1]]},
            ["disks[root].bootOrder"],
        ),
        ({"interfaces": BASE["interfaces"][:1]}, ["interfaces[nat]"]),
        ({"interfaces": [*BASE["interfaces"], {"name": "x"}]}, ["interfaces[x]"]),
        (
            {"interfaces": [{**BASE["interfaces"][0], "bridge": "br1"}, BASE["interfaces"][1]]},
            ["interfaces[lan].bridge"],
        ),
        (
            {
                "interfaces": [
                    {"name": "lan", "type": "network", "network": "n"},
                    BASE["interfaces"][1],
                ]
            },
            # A VMNetwork NIC plugs into the node's bridge of that network.
            ["interfaces[lan].bridge"],
        ),
        (
            {"interfaces": [{**BASE["interfaces"][0], "model": "e1000"}, BASE["interfaces"][1]]},
            ["interfaces[lan].model"],
        ),
        (
            {
                "interfaces": [
                    {**BASE["interfaces"][0], "macAddress": "02:00:00:00:00:01"},
                    BASE["interfaces"][1],
                ]
            },
            ["interfaces[lan].macAddress"],
        ),
    ],
)
def test_restart_changes(
    make_inputs: InputsFactory,
    make_spec: SpecFactory,
    observed_base: ObservedDomain,
    fields: dict[str, Any],
    paths: list[str],
) -> None:
    result = diff(changed(make_inputs, make_spec, **fields), observed_base)
    assert list(result.paths) == paths
    assert result.needs_restart
    assert all(c.apply is Apply.RESTART for c in result.changes)


def test_iotune_is_live(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    disks = [{**BASE["disks"][0], "iotune": {"totalIopsSec": 100}}, BASE["disks"][1]]
    result = diff(changed(make_inputs, make_spec, disks=disks), observed_base)
    (change,) = result.changes
    assert (change.path, change.apply) == ("disks[root].iotune", Apply.LIVE)
    assert change.desired == IoTuneConfig(total_iops_sec=100)
    assert change.observed is None
    assert not result.needs_restart
    assert result.live == (change,)


def test_bridge_bandwidth_is_live(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    shaped = {
        **BASE["interfaces"][0],
        "bandwidth": {"outbound": {"averageKBps": 100, "burstKB": 5}},
    }
    result = diff(
        changed(make_inputs, make_spec, interfaces=[shaped, BASE["interfaces"][1]]), observed_base
    )
    (change,) = result.changes
    assert (change.path, change.apply) == ("interfaces[lan].bandwidth", Apply.LIVE)
    assert change.desired == BandwidthConfig(outbound=BandwidthLimit(average=100, burst=5))


def test_live_and_restart_together(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    disks = [{**BASE["disks"][0], "iotune": {"readBytesSec": 1}}, BASE["disks"][1]]
    result = diff(
        changed(make_inputs, make_spec, disks=disks, memory={"size": "1Gi"}), observed_base
    )
    assert [c.path for c in result.live] == ["disks[root].iotune"]
    assert [c.path for c in result.restart] == ["memory.size"]
    assert result.needs_restart
    memory = result.get("memory.size")
    assert memory is not None
    assert (memory.desired, memory.observed) == (2**30, 512 * 2**20)
    assert result.get("nothing") is None


def test_domain_type_and_serial(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    desired = build_domain(make_inputs(make_spec(**BASE), domain_type="kvm"))
    assert diff(desired, observed_base).paths == ("domainType",)
    moved = replace(observed_base, serial_path="/elsewhere.log")
    assert diff(observe_config(changed(make_inputs, make_spec)), moved).paths == ("serial",)


def test_a_file_serial_from_before_the_console_is_redefined_as_a_pty(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    """Same log file, so nothing else differs; the restart brings `virtfleet console`."""
    desired = build_domain(make_inputs(make_spec(**BASE)))
    old = desired.to_xml()
    serial = old.find("devices/serial")
    assert serial is not None
    assert serial.get("type") == "pty"
    for element in (serial, old.find("devices/console")):
        assert element is not None
        element.set("type", "file")
        logged = element.find("log")
        assert logged is not None
        logged.tag = "source"
        logged.set("path", logged.attrib.pop("file"))
    changes = diff(desired, observe(old))
    assert changes.paths == ("serial.type",)
    assert changes.changes[0].apply is Apply.RESTART


def test_drift_behind_our_back(
    make_inputs: InputsFactory, make_spec: SpecFactory, observed_base: ObservedDomain
) -> None:
    desired = changed(make_inputs, make_spec)
    foreign_disk = replace(observed_base.disks[0], name=None, target="vdz", path="/etc/shadow")
    foreign_nic = replace(observed_base.interfaces[0], name=None, mac="52:54:00:00:00:01")
    drifted = replace(
        observed_base,
        disks=(*observed_base.disks, foreign_disk),
        interfaces=(*observed_base.interfaces, foreign_nic),
        extra_devices=("hostdev",),
        vcpus=3,
    )
    result = diff(desired, drifted)
    assert result.paths == (
        "cpu.vcpus",
        "disks[target=vdz]",
        "interfaces[mac=52:54:00:00:00:01]",
        "devices",
    )
    assert all(c.apply is Apply.RESTART for c in result.changes)


def test_diff_accepts_an_observation_as_the_desire(observed_base: ObservedDomain) -> None:
    assert not diff(observed_base, observed_base)
    bigger = replace(observed_base, memory_bytes=observed_base.memory_bytes * 2)
    assert diff(bigger, observed_base).paths == ("memory.size",)


@pytest.mark.parametrize(
    ("desired", "observed", "matches"),
    [
        (None, "pc-i440fx-7.2", True),
        ("q35", "pc-q35-7.2", True),
        ("pc", "pc-i440fx-7.2", True),
        ("pc-q35-7.2", "pc-q35-7.2", True),
        ("virt", "virt-7.2", True),
        ("q35", "pc-i440fx-7.2", False),
        ("pc", "pc-q35-7.2", False),
        ("pc-q35-7.2", "pc-q35-8.0", False),
        ("q35", None, False),
    ],
)
def test_machine_aliases(desired: str | None, observed: str | None, matches: bool) -> None:
    assert machine_matches(desired, observed) is matches


def test_cpu_model_filled_in_by_libvirt_is_not_drift(
    make_inputs: InputsFactory, make_spec: SpecFactory
) -> None:
    # Measured on QEMU 7.2 under TCG: an unset model is stored as 'qemu64', even inactive.
    desired = build_domain(make_inputs(make_spec()))
    observed = replace(observe_config(desired), cpu_model="qemu64")
    assert not diff(desired, observed)
