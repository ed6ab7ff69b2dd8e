"""Rendering: every spec feature lands in the domain XML as designed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from lxml import etree

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import (
    DiskBacking,
    DomainInputs,
    InvalidInputError,
    NodeResources,
    build_domain,
    render_xml,
    spec_hash,
)
from virtfleet.identity import METADATA_NAMESPACE, derive_mac

SpecFactory = Callable[..., VirtualMachineSpec]
InputsFactory = Callable[..., DomainInputs]

# The identity conftest's make_inputs gives every VM.
UID = "0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10"
NAMESPACE = "tenant-a"
NAME = "web-1"


def xml_of(inputs: DomainInputs) -> etree._Element:
    return etree.fromstring(render_xml(inputs).encode())


def one(root: etree._Element, path: str) -> etree._Element:
    found = root.findall(path)
    assert len(found) == 1, f"{path}: {len(found)} matches"
    return found[0]


def attrs(element: etree._Element) -> dict[str, str]:
    return {str(key): str(value) for key, value in element.attrib.items()}


def alias(element: etree._Element) -> str:
    return one(element, "alias").get("name", "")


def disks_by_alias(root: etree._Element) -> dict[str, etree._Element]:
    return {alias(d): d for d in root.iterfind("devices/disk")}


def test_identity_and_ownership(full_inputs: DomainInputs) -> None:
    root = xml_of(full_inputs)
    assert root.get("type") == "qemu"
    assert one(root, "name").text == f"{NAMESPACE}_{NAME}"
    assert one(root, "uuid").text == UID
    owner = one(root, f"metadata/{{{METADATA_NAMESPACE}}}owner")
    assert attrs(owner) == {
        "version": "1",
        "namespace": NAMESPACE,
        "name": NAME,
        "uid": UID,
        "generation": "1",
        "specHash": spec_hash(full_inputs.spec),
    }
    assert owner.prefix == "virtfleet"


def test_domain_type_is_a_parameter(make_inputs: InputsFactory) -> None:
    assert xml_of(make_inputs(domain_type="kvm")).get("type") == "kvm"


@pytest.mark.parametrize(
    ("size", "kib"),
    [
        ("128Mi", 131072),
        ("1Gi", 1048576),
        ("1G", 954 * 1024),
        ("100M", 96 * 1024),
    ],
)
def test_memory_is_whole_mebibytes_in_kib(
    size: str, kib: int, make_spec: SpecFactory, make_inputs: InputsFactory
) -> None:
    root = xml_of(make_inputs(make_spec(memory={"size": size})))
    assert one(root, "memory").get("unit") == "KiB"
    assert int(one(root, "memory").text or "") == kib
    assert one(root, "currentMemory").text == one(root, "memory").text
    assert kib % 1024 == 0


def test_vcpus_and_topology(make_spec: SpecFactory, make_inputs: InputsFactory) -> None:
    root = xml_of(make_inputs(make_spec(cpu={"sockets": 2, "cores": 3, "threads": 2})))
    assert one(root, "vcpu").text == "12"
    assert attrs(one(root, "cpu/topology")) == {"sockets": "2", "cores": "3", "threads": "2"}
    assert one(root, "cpu").get("mode") is None  # unset model: the hypervisor's default


@pytest.mark.parametrize("mode", ["host-model", "maximum"])
def test_cpu_modes(mode: str, make_spec: SpecFactory, make_inputs: InputsFactory) -> None:
    cpu = one(xml_of(make_inputs(make_spec(cpu={"model": mode}))), "cpu")
    assert cpu.get("mode") == mode
    assert cpu.find("model") is None


def test_named_cpu_model_is_exact_without_fallback(
    make_spec: SpecFactory, make_inputs: InputsFactory
) -> None:
    cpu = one(xml_of(make_inputs(make_spec(cpu={"model": "Skylake-Client"}))), "cpu")
    assert (cpu.get("mode"), cpu.get("match")) == ("custom", "exact")
    assert one(cpu, "model").text == "Skylake-Client"
    assert one(cpu, "model").get("fallback") == "forbid"


def test_host_passthrough_needs_kvm(make_spec: SpecFactory, make_inputs: InputsFactory) -> None:
    spec = make_spec(cpu={"model": "host-passthrough"})
    with pytest.raises(InvalidInputError, match="KVM"):
        build_domain(make_inputs(spec))
    cpu = one(xml_of(make_inputs(spec, domain_type="kvm")), "cpu")
    assert cpu.get("mode") == "host-passthrough"


def test_machine_and_firmware(make_spec: SpecFactory, make_inputs: InputsFactory) -> None:
    root = xml_of(make_inputs(make_spec(machine="pc-q35-7.2", firmware={"type": "uefi"})))
    assert one(root, "os").get("firmware") == "efi"
    assert one(root, "os/type").get("machine") == "pc-q35-7.2"
    assert one(root, "os/type").text == "hvm"
    plain = xml_of(make_inputs(make_spec()))
    assert one(plain, "os").get("firmware") is None
    assert one(plain, "os/type").get("machine") is None


def test_arch_is_optional(make_spec: SpecFactory, make_inputs: InputsFactory) -> None:
    spec = make_spec()
    inputs = make_inputs(spec)
    with_arch = DomainInputs(**{**inputs.__dict__, "arch": "x86_64"})
    assert one(xml_of(with_arch), "os/type").get("arch") == "x86_64"
    assert one(xml_of(inputs), "os/type").get("arch") is None


def test_disk_targets_buses_and_controller(full_inputs: DomainInputs) -> None:
    disks = disks_by_alias(xml_of(full_inputs))
    targets = {name: attrs(one(d, "target")) for name, d in disks.items()}
    assert targets == {
        "ua-disk-root": {"dev": "vda", "bus": "virtio"},
        "ua-disk-data": {"dev": "sda", "bus": "scsi"},
        "ua-disk-legacy": {"dev": "sdb", "bus": "sata"},  # sata and scsi share 'sd'
        "ua-disk-logs": {"dev": "vdb", "bus": "virtio"},
        "ua-cloudinit": {"dev": "vdc", "bus": "virtio"},
    }
    controllers = xml_of(full_inputs).findall("devices/controller")
    assert [attrs(c) for c in controllers] == [
        {"type": "scsi", "index": "0", "model": "virtio-scsi"}
    ]


def test_no_scsi_controller_without_scsi_disks(
    make_spec: SpecFactory, make_inputs: InputsFactory
) -> None:
    spec = make_spec(disks=[{"name": "root", "source": {"image": "img"}}])
    assert xml_of(make_inputs(spec)).findall("devices/controller") == []


def test_disk_driver_source_and_flags(full_inputs: DomainInputs) -> None:
    disks = disks_by_alias(xml_of(full_inputs))
    root = disks["ua-disk-root"]
    assert (root.get("type"), root.get("device")) == ("file", "disk")
    assert attrs(one(root, "driver")) == {
        "name": "qemu",
        "type": "qcow2",
        "cache": "none",
        "discard": "unmap",
    }
    assert one(root, "source").get("file") == (
        "/var/lib/libvirt/virtfleet/local/tenant-a_web-1-root.qcow2"
    )
    assert one(root, "boot").get("order") == "1"
    assert root.find("readonly") is None
    assert disks["ua-disk-data"].find("readonly") is not None
    assert disks["ua-disk-data"].find("boot") is None
    assert one(disks["ua-disk-legacy"], "boot").get("order") == "2"
    assert (
        one(disks["ua-disk-logs"], "source")
        .get("file", "")
        .startswith("/var/lib/libvirt/virtfleet/fast/")
    )


def test_iotune_drops_zero_limits(
    full_inputs: DomainInputs, make_spec: SpecFactory, make_inputs: InputsFactory
) -> None:
    iotune = one(disks_by_alias(xml_of(full_inputs))["ua-disk-root"], "iotune")
    assert [(c.tag, c.text) for c in iotune] == [
        ("total_bytes_sec", "10000000"),
        ("read_iops_sec", "500"),
    ]
    spec = make_spec(disks=[{"name": "a", "source": {"image": "i"}, "iotune": {"totalIopsSec": 0}}])
    assert xml_of(make_inputs(spec)).find("devices/disk/iotune") is None


def test_block_backing_and_cache_mode(make_spec: SpecFactory) -> None:
    spec = make_spec(disks=[{"name": "a", "source": {"image": "i"}}])
    resources = NodeResources(
        disks={"a": DiskBacking(path="/dev/vg0/a", format="raw", kind="block", cache="writeback")},
        serial_log="/var/log/s.log",
    )
    inputs = DomainInputs(
        namespace=NAMESPACE, name=NAME, uid=UID, generation=3, spec=spec, resources=resources
    )
    disk = one(xml_of(inputs), "devices/disk")
    assert disk.get("type") == "block"
    assert attrs(one(disk, "source")) == {"dev": "/dev/vg0/a"}
    assert one(disk, "driver").get("type") == "raw"
    assert one(disk, "driver").get("cache") == "writeback"


def test_read_only_sata_disk_is_refused(make_spec: SpecFactory, make_inputs: InputsFactory) -> None:
    # The API refuses this combination already; the builder refuses specs built in code too.
    spec = make_spec(disks=[{"name": "a", "bus": "sata", "source": {"image": "i"}}])
    spec = spec.model_copy(update={"disks": [spec.disks[0].model_copy(update={"read_only": True})]})
    with pytest.raises(InvalidInputError, match="sata"):
        build_domain(make_inputs(spec))


def test_direct_kernel_boot(full_inputs: DomainInputs) -> None:
    os = one(xml_of(full_inputs), "os")
    assert one(os, "kernel").text == "/var/lib/libvirt/virtfleet/images/vmlinuz"
    assert one(os, "initrd").text == "/var/lib/libvirt/virtfleet/images/initrd.img"
    assert one(os, "cmdline").text == "console=ttyS0 root=/dev/vda1"


def test_kernel_without_initrd_or_cmdline(
    make_spec: SpecFactory, make_inputs: InputsFactory
) -> None:
    os = one(xml_of(make_inputs(make_spec(kernel={"image": "k", "cmdline": ""}))), "os")
    assert os.find("kernel") is not None
    assert os.find("initrd") is None
    assert os.find("cmdline") is None


def test_cloud_init_seed_is_a_readonly_virtio_disk(full_inputs: DomainInputs) -> None:
    """Not a SATA cdrom: cloud kernels (Debian's) have no AHCI driver and never see it."""
    root = xml_of(full_inputs)
    seed = disks_by_alias(root)["ua-cloudinit"]
    assert (seed.get("type"), seed.get("device")) == ("file", "disk")
    assert one(seed, "target").get("bus") == "virtio"
    assert seed.find("readonly") is not None
    assert one(seed, "driver").get("type") == "raw"
    assert one(seed, "source").get("file", "").endswith("tenant-a_web-1-cidata.iso")
    # The user-data itself goes into the ISO, never into the domain XML.
    assert "hostname" not in render_xml(full_inputs)


def test_interfaces(full_inputs: DomainInputs) -> None:
    nics = {alias(n): n for n in xml_of(full_inputs).iterfind("devices/interface")}
    user, lan, svc = nics["ua-nic-default"], nics["ua-nic-lan"], nics["ua-nic-svc"]
    assert user.get("type") == "user"
    assert user.find("source") is None
    assert one(user, "model").get("type") == "virtio"
    assert one(user, "mac").get("address") == derive_mac(UID, "default")
    assert lan.get("type") == "bridge"
    assert attrs(one(lan, "source")) == {"bridge": "br0"}
    assert one(lan, "mac").get("address") == "02:ab:cd:ef:01:23"  # libvirt's lowercase
    assert one(lan, "model").get("type") == "e1000e"
    assert attrs(one(lan, "bandwidth/inbound")) == {
        "average": "1000",
        "peak": "2000",
        "burst": "512",
    }
    assert attrs(one(lan, "bandwidth/outbound")) == {"average": "500"}
    # A VMNetwork NIC: the node's bridge of that network, with the network's MTU.
    assert svc.get("type") == "bridge"
    assert attrs(one(svc, "source")) == {"bridge": "vfbr4096"}
    assert attrs(one(svc, "mtu")) == {"size": "1450"}
    assert svc.find("bandwidth") is None


def test_empty_bandwidth_renders_nothing(
    make_spec: SpecFactory, make_inputs: InputsFactory
) -> None:
    spec = make_spec(interfaces=[{"name": "n", "type": "bridge", "bridge": "br0", "bandwidth": {}}])
    assert xml_of(make_inputs(spec)).find("devices/interface/bandwidth") is None


def test_serial_console_is_a_pty_logged_to_a_file(full_inputs: DomainInputs) -> None:
    root = xml_of(full_inputs)
    log = "/var/log/libvirt/qemu/tenant-a_web-1-serial.log"
    serial = one(root, "devices/serial")
    assert serial.get("type") == "pty"  # virDomainOpenConsole only opens ptys
    assert attrs(one(serial, "log")) == {"file": log, "append": "on"}
    assert serial.find("source") is None
    console = one(root, "devices/console")
    assert console.get("type") == "pty"
    assert attrs(one(console, "target")) == {"type": "serial", "port": "0"}


def test_fixed_devices_and_lifecycle(full_inputs: DomainInputs) -> None:
    root = xml_of(full_inputs)
    assert root.find("devices/graphics") is None
    assert root.find("devices/video") is None
    assert one(root, "devices/memballoon").get("model") == "virtio"
    assert one(root, "devices/rng/backend").text == "/dev/urandom"
    assert [f.tag for f in one(root, "features")] == ["acpi", "apic"]
    assert one(root, "on_poweroff").text == "destroy"
    assert one(root, "on_reboot").text == "restart"
    assert one(root, "on_crash").text == "destroy"
    assert root.find("devices/emulator") is None


def test_emulator_when_given(make_inputs: InputsFactory) -> None:
    inputs = make_inputs()
    resources = NodeResources(serial_log="/var/log/s.log", emulator="/usr/bin/qemu-system-x86_64")
    inputs = DomainInputs(**{**inputs.__dict__, "resources": resources})
    assert one(xml_of(inputs), "devices/emulator").text == "/usr/bin/qemu-system-x86_64"


def test_rendering_is_deterministic(
    full_spec: VirtualMachineSpec, make_inputs: InputsFactory
) -> None:
    assert render_xml(make_inputs(full_spec)) == render_xml(make_inputs(full_spec))


def test_lifecycle_fields_do_not_change_the_domain(
    full_spec: VirtualMachineSpec, make_inputs: InputsFactory
) -> None:
    wire = {**full_spec.to_wire(), "runStrategy": "Halted", "terminationGracePeriodSeconds": 5}
    other = VirtualMachineSpec.model_validate({**wire, "nodeName": "n2"})
    assert render_xml(make_inputs(other)) == render_xml(make_inputs(full_spec))


# --- inputs are checked before anything is built ----------------------------------------


def _inputs(spec: VirtualMachineSpec, **resources: Any) -> DomainInputs:
    resources.setdefault("serial_log", "/var/log/s.log")
    return DomainInputs(
        namespace=NAMESPACE,
        name=NAME,
        uid=UID,
        generation=1,
        spec=spec,
        resources=NodeResources(**resources),
    )


def test_every_disk_needs_a_backing(make_spec: SpecFactory) -> None:
    spec = make_spec(disks=[{"name": "a", "source": {"image": "i"}}])
    with pytest.raises(InvalidInputError, match="no backing"):
        _inputs(spec)
    with pytest.raises(InvalidInputError, match="not in the spec"):
        _inputs(make_spec(), disks={"x": DiskBacking(path="/x", format="raw")})


@pytest.mark.parametrize(
    ("spec_fields", "resources", "message"),
    [
        ({"kernel": {"image": "k"}}, {}, "spec.kernel is set"),
        ({}, {"kernel": "/k"}, "spec.kernel is not set"),
        ({"kernel": {"image": "k", "initrd": "i"}}, {"kernel": "/k"}, "spec.kernel.initrd is set"),
        ({"kernel": {"image": "k"}}, {"kernel": "/k", "initrd": "/i"}, "initrd is not set"),
        ({"cloudInit": {"userData": "x"}}, {}, "spec.cloudInit is set"),
        ({}, {"cloud_init_seed": "/s.iso"}, "spec.cloudInit is not set"),
    ],
)
def test_resources_match_the_spec(
    spec_fields: dict[str, Any], resources: dict[str, Any], message: str, make_spec: SpecFactory
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        _inputs(make_spec(**spec_fields), **resources)


@pytest.mark.parametrize(
    "path",
    [
        "relative/x",
        "/a/../etc/passwd",
        "/a/./b",
        "//server/x",
        "/a//b",
        "/a/",
        "/a\x00b",
        "/a\nb",
        "/a\tb",
        "/a\rb",
        "",
    ],
)
def test_host_paths_must_be_plain_and_absolute(path: str) -> None:
    with pytest.raises(InvalidInputError):
        DiskBacking(path=path, format="qcow2")
    with pytest.raises(InvalidInputError):
        NodeResources(serial_log=path)


def test_backing_values_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="format"):
        DiskBacking(path="/a", format="vmdk")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="kind"):
        DiskBacking(path="/a", format="raw", kind="network")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="cache"):
        DiskBacking(path="/a", format="raw", cache="unsafe")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "identity",
    [
        {"namespace": "Bad_NS"},
        {"namespace": "a" * 64},
        {"name": "x_y"},
        {"name": 'a"b'},
        {"name": "a<b>"},
        {"uid": "not-a-uuid"},
        {"uid": UID.upper()},
        {"generation": -1},
        {"domain_type": "xen"},
        {"arch": "x86_64'/>"},
    ],
)
def test_identity_is_checked(identity: dict[str, Any], make_spec: SpecFactory) -> None:
    fields: dict[str, Any] = {
        "namespace": NAMESPACE,
        "name": NAME,
        "uid": UID,
        "generation": 1,
        "spec": make_spec(),
        "resources": NodeResources(serial_log="/var/log/s.log"),
        **identity,
    }
    with pytest.raises(InvalidInputError):
        DomainInputs(**fields)


def test_resources_mapping_is_frozen() -> None:
    backing = {"a": DiskBacking(path="/a", format="raw")}
    resources = NodeResources(disks=backing, serial_log="/s")
    backing["b"] = DiskBacking(path="/b", format="raw")
    assert set(resources.disks) == {"a"}
    with pytest.raises(TypeError):
        resources.disks["c"] = backing["a"]  # type: ignore[index]


def test_every_domain_has_the_guest_agents_channel(full_inputs: DomainInputs) -> None:
    (channel,) = xml_of(full_inputs).iterfind("devices/channel")
    assert channel.get("type") == "unix"
    assert attrs(one(channel, "source")) == {"mode": "bind"}  # libvirt picks the path
    assert attrs(one(channel, "target")) == {
        "type": "virtio",
        "name": "org.qemu.guest_agent.0",
    }
