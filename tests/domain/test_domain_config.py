"""The XML object model: round trips, refusal of unsafe strings, safe parsing."""

from __future__ import annotations

import pytest
from lxml import etree

from virtfleet.domain import MalformedDomainError, UnsafeValueError, parse_xml
from virtfleet.domain.config import (
    BandwidthConfig,
    BandwidthLimit,
    ConsoleConfig,
    ControllerConfig,
    CpuConfig,
    DiskConfig,
    DomainConfig,
    InterfaceConfig,
    IoTuneConfig,
    MemballoonConfig,
    OsConfig,
    RngConfig,
    SerialConfig,
    XmlConfig,
    xml_safe,
)
from virtfleet.domain.naming import target_dev

EXAMPLES: list[XmlConfig] = [
    IoTuneConfig(total_bytes_sec=1, read_iops_sec=2),
    IoTuneConfig(),
    BandwidthConfig(inbound=BandwidthLimit(average=1, peak=2, burst=3)),
    BandwidthConfig(outbound=BandwidthLimit(average=5)),
    DiskConfig(
        kind="file",
        format="qcow2",
        cache="none",
        discard="unmap",
        path="/a b/<c>&'d\".qcow2",
        target_dev="vda",
        target_bus="virtio",
        boot_order=2,
        iotune=IoTuneConfig(write_bytes_sec=9),
        alias="ua-disk-x",
    ),
    DiskConfig(
        kind="block",
        format="raw",
        path="/dev/sdb",
        target_dev="sda",
        target_bus="scsi",
        readonly=True,
    ),
    DiskConfig(device="cdrom", target_dev="sdc", target_bus="sata", readonly=True),
    ControllerConfig(type="scsi", model="virtio-scsi"),
    InterfaceConfig(type="user", mac="02:00:00:00:00:01", model="virtio"),
    InterfaceConfig(
        type="bridge",
        source="br0",
        mac="02:00:00:00:00:02",
        model="e1000",
        bandwidth=BandwidthConfig(inbound=BandwidthLimit(average=1)),
        alias="ua-nic-a",
    ),
    InterfaceConfig(type="network", source="default"),
    SerialConfig(path="/var/log/x.log"),
    SerialConfig(path="/var/log/x.log", append=False, port=1),
    ConsoleConfig(path="/var/log/x.log"),
    MemballoonConfig(),
    RngConfig(),
    CpuConfig(),
    CpuConfig(mode="host-model", sockets=1, cores=2, threads=1),
    CpuConfig(mode="custom", match="exact", model="qemu64", fallback="forbid"),
    OsConfig(),
    OsConfig(
        arch="x86_64",
        machine="q35",
        firmware="efi",
        kernel="/k",
        initrd="/i",
        cmdline='a="b" <c> & ]]> \n\t ünï ☃ 𝄞',
    ),
]


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: type(c).__name__)
def test_round_trip(config: XmlConfig) -> None:
    element = config.to_xml()
    assert type(config).parse(element) == config
    # ... and through text, where the escaping happens.
    reparsed = parse_xml(etree.tostring(element))
    assert type(config).parse(reparsed) == config


def test_domain_round_trip() -> None:
    domain = DomainConfig(
        virt_type="kvm",
        name="ns_vm",
        uuid="0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10",
        memory_kib=131072,
        current_memory_kib=65536,
        vcpus=2,
        os=OsConfig(machine="pc"),
        cpu=CpuConfig(sockets=1, cores=2, threads=1),
        emulator="/usr/bin/qemu-system-x86_64",
        disks=(DiskConfig(path="/x", target_dev="vda", target_bus="virtio"),),
        controllers=(ControllerConfig(type="scsi", model="virtio-scsi"),),
        interfaces=(InterfaceConfig(type="user"),),
        serial=SerialConfig(path="/s"),
        console=ConsoleConfig(path="/s"),
        memballoon=MemballoonConfig(),
        rng=RngConfig(),
    )
    assert DomainConfig.from_string(domain.to_string()) == domain


def test_cmdline_escaping_is_inert() -> None:
    hostile = "</cmdline><qemu:commandline/>]]>&amp;\"'"
    text = etree.tostring(OsConfig(kernel="/k", cmdline=hostile).to_xml(), encoding="unicode")
    assert "<qemu" not in text
    root = parse_xml(text)
    assert [child.tag for child in root] == ["type", "kernel", "cmdline"]
    assert root.findtext("cmdline") == hostile


@pytest.mark.parametrize(
    "bad", ["\x00", "a\x01b", "\x1b[31m", "\r", "a\r\nb", "\ufffe", "\ud800", "\x7f\x0b"]
)
def test_strings_xml_cannot_carry_are_refused(bad: str) -> None:
    if bad == "\x7f\x0b":  # DEL is legal XML; the vertical tab is not
        with pytest.raises(UnsafeValueError, match=r"'\\x0b' at offset 1"):
            xml_safe(bad, "x")
        return
    with pytest.raises(UnsafeValueError):
        xml_safe(bad, "field")
    with pytest.raises(UnsafeValueError):
        OsConfig(cmdline=bad).to_xml()
    with pytest.raises(UnsafeValueError):
        DiskConfig(path=f"/a{bad}", target_dev="vda", target_bus="virtio").to_xml()


def test_source_path_needs_a_file_or_block_disk() -> None:
    with pytest.raises(UnsafeValueError):
        DiskConfig(kind="network", path="/x", target_dev="vda", target_bus="virtio").to_xml()
    with pytest.raises(UnsafeValueError):
        InterfaceConfig(type="user", source="br0").to_xml()


def test_parse_refuses_entities_and_doctypes() -> None:
    xxe = (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<domain type='qemu'><name>&x;</name></domain>"
    )
    with pytest.raises(MalformedDomainError, match="DOCTYPE"):
        parse_xml(xxe)
    with pytest.raises(MalformedDomainError, match="well-formed"):
        parse_xml("<domain><name>")


def test_parse_reads_libvirt_units_and_expanded_firmware() -> None:
    domain = DomainConfig.from_string(
        """<domain type='qemu'><name>n</name><uuid>0B9C1C4E-2F63-4D1A-9A55-7D0C3C1F2E10</uuid>
        <memory unit='MiB'>2</memory><currentMemory>1024</currentMemory>
        <os><type>hvm</type>
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader></os>
        <devices><graphics type='vnc'/><video><model type='vga'/></video><hostdev/>
        <input type='mouse' bus='ps2'/></devices></domain>"""
    )
    assert domain.memory_kib == 2048
    assert domain.current_memory_kib == 1024
    assert domain.uuid == "0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10"
    assert domain.os.firmware == "efi"
    assert domain.vcpus == 1
    assert domain.extra_devices == ("graphics", "hostdev")  # video/input are libvirt's defaults


@pytest.mark.parametrize(
    "document",
    [
        "<notadomain/>",
        "<domain type='qemu'><uuid>x</uuid><memory>1</memory></domain>",
        "<domain type='qemu'><name>n</name><uuid>u</uuid></domain>",
        "<domain type='qemu'><name>n</name><uuid>u</uuid><memory unit='parsec'>1</memory></domain>",
        "<domain type='qemu'><name>n</name><uuid>u</uuid><memory>lots</memory></domain>",
        "<domain><name>n</name><uuid>u</uuid><memory>1</memory></domain>",
        "<domain type='qemu'><name>n</name><uuid>u</uuid><memory>1</memory>"
        "<devices><disk/></devices></domain>",
    ],
)
def test_malformed_domains_raise(document: str) -> None:
    with pytest.raises(MalformedDomainError):
        DomainConfig.from_string(document)


@pytest.mark.parametrize(
    ("index", "name"),
    [
        (0, "vda"),
        (1, "vdb"),
        (25, "vdz"),
        (26, "vdaa"),
        (27, "vdab"),
        (701, "vdzz"),
        (702, "vdaaa"),
    ],
)
def test_target_dev_numbering(index: int, name: str) -> None:
    assert target_dev("vd", index) == name


def test_target_dev_refuses_negative_indexes() -> None:
    with pytest.raises(ValueError, match="negative"):
        target_dev("vd", -1)
