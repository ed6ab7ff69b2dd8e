"""Snapshot pieces the restore relies on: disk plan, restore marker, job barrier."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from virtfleet.hypervisor import Guest, Hypervisor, InvalidName, snapshots

UID = "7c9e6679-7425-40de-944b-e07fc1f90ae8"

DOMAIN_DISKS = """<domain><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/p/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/>
    <source file='/p/b.raw'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
    <source file='/p/seed.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/p/ro.qcow2'/><target dev='vdc' bus='virtio'/><readonly/></disk>
  <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/></disk>
</devices></domain>"""


def test_disk_plan_keeps_writable_qcow2_only() -> None:
    assert snapshots.disk_plan(DOMAIN_DISKS) == {
        "vda": "internal",
        "vdb": "no",
        "sda": "no",
        "vdc": "no",
        "sdb": "no",
    }


def test_snapshot_xml_lists_the_disks() -> None:
    xml = snapshots.snapshot_xml("s", include_memory=True, disks={"vda": "internal", "sda": "no"})
    root = etree.fromstring(xml.encode())
    assert [(d.get("name"), d.get("snapshot")) for d in root.findall("disks/disk")] == [
        ("vda", "internal"),
        ("sda", "no"),
    ]
    with pytest.raises(ValueError, match="internal, external or no"):
        snapshots.snapshot_xml("s", include_memory=True, disks={"vda": "yes"})


@pytest.fixture
async def running(hv: Hypervisor, domain_xml: Any) -> Guest:
    guest = await hv.define(domain_xml("marker-vm", UID))
    await guest.start()
    return guest


async def test_restore_marker_disappears_exactly_when_a_revert_happens(running: Guest) -> None:
    await snapshots.create_snapshot(running, "s1", include_memory=True)
    assert await snapshots.restore_marker(running) is None
    token = "0b5a3a1c-1111-4222-8333-444455556666"
    await snapshots.set_restore_marker(running, token)
    await snapshots.set_restore_marker(running, token)  # idempotent
    assert await snapshots.restore_marker(running) == token
    await snapshots.barrier(running)  # nothing running: returns at once
    assert await snapshots.restore_marker(running) == token  # the barrier changes nothing

    await snapshots.revert(running, "s1")
    assert await snapshots.restore_marker(running) is None
    current = await snapshots.current(running)
    assert current is not None
    assert current.name == "s1"


async def test_marker_on_a_stopped_domain(running: Guest) -> None:
    await running.destroy()
    await snapshots.set_restore_marker(running, "abc")
    assert await snapshots.restore_marker(running) == "abc"
    await snapshots.barrier(running)


async def test_marker_tokens_are_checked(running: Guest) -> None:
    with pytest.raises(InvalidName):
        await snapshots.set_restore_marker(running, "../x")
