"""Observation: build → XML → observe gives the spec's values back; foreign XML is read safely."""

from __future__ import annotations

from collections.abc import Callable

from lxml import etree

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import (
    DomainConfig,
    DomainInputs,
    build_domain,
    observe,
    render_xml,
    spec_hash,
)
from virtfleet.domain.config import IoTuneConfig
from virtfleet.domain.observe import observe_config
from virtfleet.identity import METADATA_NAMESPACE, derive_mac

InputsFactory = Callable[..., DomainInputs]
SpecFactory = Callable[..., VirtualMachineSpec]


def test_round_trip_gives_back_the_spec(full_inputs: DomainInputs) -> None:
    spec = full_inputs.spec
    seen = observe(render_xml(full_inputs))
    assert seen.uuid == full_inputs.uid
    assert seen.name == "tenant-a_web-1"
    assert seen.virt_type == "qemu"
    assert seen.owner is not None
    assert (seen.owner.namespace, seen.owner.name, seen.owner.uid) == (
        "tenant-a",
        "web-1",
        full_inputs.uid,
    )
    assert seen.owner.generation == 1
    assert seen.owner.spec_hash == spec_hash(spec)
    assert seen.owner_error is None
    assert seen.memory_bytes == spec.memory.size.bytes == 2**30
    assert (seen.sockets, seen.cores, seen.threads) == (1, 2, 2)
    assert seen.vcpus == 4
    assert seen.cpu_model == "host-model"
    assert seen.machine == "q35"
    assert seen.firmware == "uefi"
    assert seen.kernel == "/var/lib/libvirt/virtfleet/images/vmlinuz"
    assert seen.initrd == "/var/lib/libvirt/virtfleet/images/initrd.img"
    assert seen.cmdline == "console=ttyS0 root=/dev/vda1"
    assert seen.cloud_init_seed == "/var/lib/libvirt/virtfleet/local/tenant-a_web-1-cidata.iso"
    assert seen.serial_path == "/var/log/libvirt/qemu/tenant-a_web-1-serial.log"
    assert seen.extra_devices == ()

    assert [d.name for d in seen.disks] == [d.name for d in spec.disks]  # seed is not a disk
    for disk in spec.disks:
        got = seen.disk(disk.name)
        assert got is not None
        assert got.bus == disk.bus.value
        assert got.readonly == disk.read_only
        assert got.boot_order == disk.boot_order
        assert got.path == full_inputs.resources.disks[disk.name].path
        assert (got.format, got.kind, got.device) == ("qcow2", "file", "disk")
    root = seen.disk("root")
    assert root is not None
    assert root.iotune == IoTuneConfig(total_bytes_sec=10_000_000, read_iops_sec=500)

    assert [i.name for i in seen.interfaces] == [i.name for i in spec.interfaces]
    default, lan, svc = seen.interfaces
    assert (default.type, default.source, default.model) == ("user", None, "virtio")
    assert default.mac == derive_mac(full_inputs.uid, "default")
    assert (lan.type, lan.source, lan.model, lan.mac) == (
        "bridge",
        "br0",
        "e1000e",
        "02:ab:cd:ef:01:23",
    )
    assert lan.bandwidth is not None
    assert lan.bandwidth.inbound is not None
    assert (lan.bandwidth.inbound.average, lan.bandwidth.inbound.peak) == (1000, 2000)
    # A VMNetwork NIC is a bridge NIC on the network's bridge of the node.
    assert (svc.type, svc.source, svc.model) == ("bridge", "vfbr4096", "rtl8139")
    assert seen.interface("nope") is None
    assert seen.disk("nope") is None


def test_observe_config_equals_observing_the_xml(full_inputs: DomainInputs) -> None:
    config = build_domain(full_inputs)
    assert observe_config(config) == observe(render_xml(full_inputs))
    assert observe(config.to_xml()) == observe_config(config)
    assert DomainConfig.from_string(render_xml(full_inputs)) == config


def test_minimal_spec(make_inputs: InputsFactory) -> None:
    seen = observe(render_xml(make_inputs()))
    assert (seen.cpu_model, seen.machine, seen.firmware) == (None, None, "bios")
    assert (seen.kernel, seen.initrd, seen.cmdline, seen.cloud_init_seed) == (None,) * 4
    assert (seen.disks, seen.interfaces) == ((), ())
    assert (seen.vcpus, seen.sockets, seen.cores, seen.threads) == (1, 1, 1, 1)


def test_named_and_passthrough_cpu_models(
    make_inputs: InputsFactory, make_spec: SpecFactory
) -> None:
    named = observe(render_xml(make_inputs(make_spec(cpu={"model": "Haswell-noTSX"}))))
    assert named.cpu_model == "Haswell-noTSX"
    passthrough = make_inputs(make_spec(cpu={"model": "host-passthrough"}), domain_type="kvm")
    assert observe(render_xml(passthrough)).cpu_model == "host-passthrough"


FOREIGN = """<domain type='kvm'>
  <name>hand-made</name><uuid>11111111-2222-4333-8444-555555555555</uuid>
  <memory unit='GiB'>1</memory><vcpu>3</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><source file='/srv/x.img'/><target dev='hda' bus='ide'/></disk>
    <interface type='network'>
      <mac address='52:54:00:AA:BB:CC'/><source network='default'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <graphics type='spice'/>
  </devices>
</domain>"""


def test_foreign_domain_without_marker() -> None:
    seen = observe(FOREIGN)
    assert seen.owner is None
    assert seen.owner_error is None
    assert seen.memory_bytes == 2**30
    assert (seen.vcpus, seen.sockets, seen.cores, seen.threads) == (3, 3, 1, 1)
    assert seen.disks[0].name is None
    assert seen.disks[0].path == "/srv/x.img"
    assert seen.interfaces[0].name is None
    assert seen.interfaces[0].mac == "52:54:00:aa:bb:cc"
    assert seen.serial_path is None  # a pty, not a file
    assert seen.extra_devices == ("graphics",)


def test_unreadable_marker_is_reported_not_ignored(full_inputs: DomainInputs) -> None:
    root = etree.fromstring(render_xml(full_inputs).encode())
    marker = root.find(f"metadata/{{{METADATA_NAMESPACE}}}owner")
    assert marker is not None
    marker.set("version", "99")
    seen = observe(root)
    assert seen.owner is None
    assert seen.owner_error is not None
    assert "version '99'" in seen.owner_error
    # The caller's tree is left as it was.
    assert root.find(f"metadata/{{{METADATA_NAMESPACE}}}owner") is not None


def test_other_metadata_is_ignored(full_inputs: DomainInputs) -> None:
    root = etree.fromstring(render_xml(full_inputs).encode())
    metadata = root.find("metadata")
    assert metadata is not None
    etree.SubElement(metadata, "{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo")
    assert observe(root).owner is not None
