"""The stored snapshot XML is held to what virtfleet takes before it is ever redefined.

A revert replaces the domain with the ``<domain>`` of the snapshot, and the XML comes back
from ``VMSnapshot.status``: whoever could write it must not be able to make an agent revert
to host devices, host files or QEMU arguments. The accepted documents are real libvirt 9.0
output (``data/``: an internal snapshot of a running and of a stopped VM the agent made,
and the VM's live domain) and the renderer's fullest domain; every hostile variant is one
edit of the real snapshot.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lxml import etree

from virtfleet.domain import DomainInputs, render_xml
from virtfleet.domain.snapshot_check import (
    SnapshotBounds,
    UnsafeSnapshotError,
    check_snapshot_xml,
)

DATA = Path(__file__).parent / "data"
UID = "11111111-2222-4333-8444-555555555555"
OTHER_UID = "22222222-2222-4333-8444-555555555555"
LOCAL = "/var/lib/libvirt/virtfleet/local"
SHARED = "/var/lib/libvirt/virtfleet/shared"
IMAGES = "/var/lib/libvirt/virtfleet/images"
RUNNING = (DATA / "snapshot-running.xml").read_text()
SHUTOFF = (DATA / "snapshot-shutoff.xml").read_text()
LIVE = (DATA / "domain-live.xml").read_text()
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def name_of(xml: str) -> str:
    found = re.search(r"<name>(vf-[^<]+)</name>", xml)
    assert found is not None
    return found.group(1)


def bounds(xml: str = RUNNING, **changes: str) -> SnapshotBounds:
    values = {"namespace": "ns", "name": "vm", "uid": UID, "snapshot_name": name_of(xml)}
    values.update(changes)
    return SnapshotBounds(**values, volume_dirs=(LOCAL, SHARED), image_dirs=(IMAGES,))


def check(xml: str, references: tuple[str, ...] = (LIVE,), **changes: str) -> None:
    check_snapshot_xml(xml, references, bounds(xml, **changes))


@pytest.mark.parametrize("xml", [RUNNING, SHUTOFF], ids=["running", "shutoff"])
def test_what_libvirt_made_of_a_virtfleet_vm_is_accepted(xml: str) -> None:
    check(xml)


def test_everything_the_renderer_writes_is_accepted(full_inputs: DomainInputs) -> None:
    """The fullest spec (UEFI, q35, iotune, bandwidth, three NIC types, SCSI, seed disk,
    agent channel)."""
    domain = render_xml(full_inputs)
    snapshot = (
        "<domainsnapshot><name>vf-x</name><state>shutoff</state><memory snapshot='no'/>"
        f"{domain}</domainsnapshot>"
    )
    ns, name, uid = full_inputs.namespace, full_inputs.name, full_inputs.uid
    check_snapshot_xml(
        snapshot,
        [domain],
        SnapshotBounds(namespace=ns, name=name, uid=uid, snapshot_name="vf-x"),
    )


def test_a_weaker_network_filter_is_refused(full_inputs: DomainInputs) -> None:
    """The NICs' nwfilter is the one the VM's domain has now, not one the XML names."""
    domain = render_xml(full_inputs)
    assert "<filterref filter=" in domain
    hostile = re.sub(r"<filterref filter=\"[^\"]+\"", '<filterref filter="allow-arp"', domain)
    snapshot = f"<domainsnapshot><name>vf-x</name>{hostile}</domainsnapshot>"
    ns, name, uid = full_inputs.namespace, full_inputs.name, full_inputs.uid
    with pytest.raises(UnsafeSnapshotError, match="network filter 'allow-arp'"):
        check_snapshot_xml(
            snapshot,
            [domain],
            SnapshotBounds(namespace=ns, name=name, uid=uid, snapshot_name="vf-x"),
        )


def test_a_disk_of_this_vm_in_another_pool_and_an_image_store_kernel_are_accepted() -> None:
    """Not in today's domain, but paths virtfleet gives this VM on this node."""
    moved = RUNNING.replace(f"{SHARED}/{UID}-data.qcow2", f"{LOCAL}/{UID}-data.qcow2")
    moved = moved.replace(f"{IMAGES}/guest-vmlinuz", f"{IMAGES}/other-kernel")
    check(moved)


LOG = "/var/log/libvirt/virtfleet-serial/ns_vm.log"
#: What libvirt 9.0 writes for the pty serial port of a running VM (the console's live XML
#: as `virsh dumpxml` showed it in the harness).
PTY_SERIAL = (
    "<serial type='pty'><source path='/dev/pts/3'/>"
    f"<log file='{LOG}' append='on'/>"
    "<target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>"
    "<console type='pty' tty='/dev/pts/3'><source path='/dev/pts/3'/>"
    f"<log file='{LOG}' append='on'/><target type='serial' port='0'/></console>"
)


def as_pty(xml: str) -> str:
    """The same document from a VM whose serial port is a pty (virtfleet's now)."""
    return re.sub(r"<serial type='file'>.*?</console>", PTY_SERIAL, xml, flags=re.S)


def test_a_pty_console_of_a_running_vm_is_accepted() -> None:
    running = as_pty(RUNNING)
    assert running.count("tty='/dev/pts/3'") == 2  # active and inactive definitions
    check(running, references=(as_pty(LIVE),))
    check(running)  # a VM redefined since, or not: the log is what must match


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("<console type='pty' tty='/dev/pts/3'>", "<console type='file' tty='/dev/pts/3'>"),
        ("tty='/dev/pts/3'", "tty='/dev/sda'"),
        (f"<log file='{LOG}'", "<log file='/etc/passwd'"),
        (
            "<serial type='pty'><source path='/dev/pts/3'/>",
            "<serial type='pty'><source path='/etc/shadow'/>",
        ),
    ],
    ids=["tty-on-a-file", "tty-not-a-pty", "log-elsewhere", "pty-source-a-file"],
)
def test_pty_consoles_are_held_to_ptys_and_the_vms_log(old: str, new: str) -> None:
    with pytest.raises(UnsafeSnapshotError):
        check(edit(old, new, as_pty(RUNNING)), references=(as_pty(LIVE),))


def edit(old: str, new: str, xml: str = RUNNING) -> str:
    assert old in xml, old
    return xml.replace(old, new, 1)


DEVICES = "<devices>"
DOMAIN_END = "</domain>"
DATA_DISK = f"{SHARED}/{UID}-data.qcow2"

HOSTILE = {
    "hostdev": (DEVICES, "<devices><hostdev mode='subsystem' type='pci' managed='yes'>"
                "<source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>"),
    "host block device as disk": (DATA_DISK, "/dev/sda"),
    "host file as disk": (DATA_DISK, "/etc/shadow"),
    "another VM's volume": (DATA_DISK, f"{SHARED}/{OTHER_UID}-data.qcow2"),
    "a path escaping the pool": (DATA_DISK, f"{SHARED}/../../../../etc/{UID}-x"),
    "network disk": ("<disk type='file' device='disk'>", "<disk type='network' device='disk'>"),
    "qemu:commandline": (DOMAIN_END, f"<qemu:commandline xmlns:qemu='{QEMU_NS}'>"
                         "<qemu:arg value='-device'/></qemu:commandline></domain>"),
    "qemu namespace in devices": (DEVICES, f"<devices><qemu:x xmlns:qemu='{QEMU_NS}'/>"),
    "namespaced attribute": ("<rng model='virtio'>",
                             f"<rng xmlns:q='{QEMU_NS}' q:x='1' model='virtio'>"),
    "filesystem passthrough": (DEVICES, "<devices><filesystem type='mount'>"
                               "<source dir='/'/><target dir='host'/></filesystem>"),
    "unix channel": (DEVICES, "<devices><channel type='unix'><source mode='bind' "
                     "path='/run/evil.sock'/><target type='virtio'/></channel>"),
    "agent channel at another socket": (
        DEVICES, "<devices><channel type='unix'><source mode='bind' path='/run/libvirt/"
        "libvirt-sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"),
    "agent channel escaping libvirt's directory": (
        DEVICES, "<devices><channel type='unix'><source mode='bind' path='/var/lib/libvirt/"
        "qemu/channel/target/domain-1-x/../../../../../../run/org.qemu.guest_agent.0'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"),
    "graphics": (DEVICES, "<devices><graphics type='vnc' listen='0.0.0.0'/>"),
    "emulator": ("<emulator>/usr/bin/qemu-system-x86_64", "<emulator>/bin/sh"),
    "kernel": (f"<kernel>{IMAGES}/guest-vmlinuz", "<kernel>/etc/shadow"),
    "firmware loader": ("<kernel>", "<loader type='rom'>/etc/shadow</loader><kernel>"),
    "serial log": ("/var/log/libvirt/virtfleet-serial/ns_vm.log", "/etc/passwd"),
    "file serial writing to a host pty": ("/var/log/libvirt/virtfleet-serial/ns_vm.log",
                                          "/dev/pts/0"),
    "rng backend": ("<backend model='random'>/dev/urandom", "<backend model='random'>/dev/sda"),
    "interface script": ("<interface type='user'>",
                         "<interface type='user'><script path='/tmp/x'/>"),
    "ethernet interface": ("<interface type='user'>", "<interface type='ethernet'>"),
    "interface on a host tap": ("<model type='virtio'/>",
                                "<model type='virtio'/><target dev='eth0' managed='no'/>"),
    "static security label": (
        "<clock",
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel><clock",
    ),
    "extra driver attribute": ("discard='unmap'/>", "discard='unmap' copy_on_read='on'/>"),
    "external memory file": ("<memory snapshot='internal'/>",
                             "<memory snapshot='external' file='/etc/shadow'/>"),
    "external disk overlay": ("<disk name='vda' snapshot='internal'/>",
                              "<disk name='vda' snapshot='external'><source file='/etc/x'/>"
                              "</disk>"),
    "foreign metadata": ("</metadata>", "<x:y xmlns:x='https://example.com/x'/></metadata>"),
    "owner marker of another VM": (f'uid="{UID}"', f'uid="{OTHER_UID}"'),
    "domain uuid of another VM": (f"<uuid>{UID}</uuid>", f"<uuid>{OTHER_UID}</uuid>"),
    "domain name of another VM": ("<name>ns_vm</name>", "<name>ns_other</name>"),
    "more memory than the VM": ("<memory unit='KiB'>131072", "<memory unit='KiB'>134217728"),
    "sysinfo": ("<vcpu", "<sysinfo type='smbios'/><vcpu"),
    "text in an empty element": ("<readonly/>", "<readonly>x</readonly>"),
}  # fmt: skip


def test_the_guest_agents_channel_at_libvirts_own_socket_is_accepted() -> None:
    channel = (
        "<devices><channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/"
        "channel/target/domain-3-ns_vm/org.qemu.guest_agent.0'/><target type='virtio' "
        "name='org.qemu.guest_agent.0' state='connected'/><alias name='channel0'/>"
        "<address type='virtio-serial' controller='0' bus='0' port='1'/></channel>"
    )
    check(edit(DEVICES, channel))


@pytest.mark.parametrize(("old", "new"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_snapshot_xml_is_refused(old: str, new: str) -> None:
    with pytest.raises(UnsafeSnapshotError):
        check(edit(old, new))


def test_the_inactive_domain_and_the_cookie_are_checked_too() -> None:
    start = RUNNING.index("<inactiveDomain")
    inactive_devices = RUNNING.index(DEVICES, start)
    hostile = (
        RUNNING[:inactive_devices]
        + "<devices><hostdev mode='subsystem' type='usb'/>"
        + RUNNING[inactive_devices + len(DEVICES) :]
    )
    with pytest.raises(UnsafeSnapshotError, match="inactiveDomain/devices"):
        check(hostile)
    with pytest.raises(UnsafeSnapshotError, match="cookie"):
        check(edit("</cookie>", "<nbd port='1'/></cookie>"))
    check(edit("</cookie>", "<slirpHelper/></cookie>"))  # a flag QEMU's cookie may hold


@pytest.mark.parametrize(
    ("security_label", "ok"),
    [
        ("<seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-x</label>"
         "<imagelabel>libvirt-x</imagelabel></seclabel>", True),
        ("<seclabel type='dynamic' model='selinux' relabel='yes'/>", True),
        ("<seclabel type='none' model='none'/>", False),
        ("<seclabel type='dynamic' model='selinux' relabel='no'/>", False),
        ("<seclabel type='dynamic' model='selinux'><baselabel>unconfined_t</baselabel>"
         "</seclabel>", False),
    ],
)  # fmt: skip
def test_only_dynamic_security_labels(security_label: str, ok: bool) -> None:
    """libvirt makes a dynamic label at start; anything else would pick QEMU's confinement."""
    xml = edit("<clock", f"{security_label}<clock")
    if ok:
        check(xml)
    else:
        with pytest.raises(UnsafeSnapshotError, match="seclabel"):
            check(xml)


def test_the_names_come_from_the_objects_not_from_the_xml() -> None:
    with pytest.raises(UnsafeSnapshotError, match="snapshot name"):
        check(RUNNING, snapshot_name="vf-another")
    with pytest.raises(UnsafeSnapshotError, match="uuid"):
        check(RUNNING, uid=OTHER_UID)
    with pytest.raises(UnsafeSnapshotError, match="domain name"):
        check(RUNNING, name="other")


def test_the_owner_marker_is_required() -> None:
    root = etree.fromstring(RUNNING.encode())
    for metadata in root.iter("metadata"):
        metadata.getparent().remove(metadata)  # type: ignore[union-attr]
    with pytest.raises(UnsafeSnapshotError, match="owner marker"):
        check(etree.tostring(root, encoding="unicode"))


@pytest.mark.parametrize(
    "document",
    [
        "<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/shadow'>]><domainsnapshot/>",
        "<domainsnapshot",
        "<domain/>",
        "<domainsnapshot><name>vf-x</name></domainsnapshot>",
    ],
    ids=["entity", "not well-formed", "not a snapshot", "no domain"],
)
def test_documents_that_are_not_snapshots_are_refused(document: str) -> None:
    with pytest.raises(UnsafeSnapshotError):
        check_snapshot_xml(document, [LIVE], bounds(snapshot_name="vf-x"))


def test_without_a_domain_to_compare_nothing_is_accepted() -> None:
    with pytest.raises(UnsafeSnapshotError, match="not defined"):
        check(RUNNING, references=())
