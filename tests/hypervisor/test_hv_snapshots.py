"""Snapshots on the test driver (it supports internal snapshots with memory)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from lxml import etree

from virtfleet.hypervisor import Guest, GuestState, Hypervisor, InvalidName, Unsupported, snapshots

UID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def attr(root: etree._Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the element at ``path`` (which must exist)."""
    element = root.find(path)
    assert element is not None, path
    return element.get(name)


@pytest.fixture
async def running(hv: Hypervisor, domain_xml: Any) -> Guest:
    guest = await hv.define(domain_xml("snap-vm", UID))
    await guest.start()
    return guest


async def test_create_list_current(running: Guest) -> None:
    assert await snapshots.list_snapshots(running) == []
    assert await snapshots.current(running) is None

    first = await snapshots.create_snapshot(
        running, "s1", include_memory=True, description='{"vmsnapshot": "nightly"}'
    )
    assert (first.name, first.state, first.has_memory, first.disk_only) == (
        "s1",
        "running",
        True,
        False,
    )
    assert first.description == '{"vmsnapshot": "nightly"}'
    assert first.current
    assert first.parent is None
    assert first.creation_time > 0

    # The test driver records memory for every snapshot of a running domain, even when
    # asked for none (QEMU refuses instead); what libvirt reports is what we return.
    second = await snapshots.create_snapshot(running, "s2", include_memory=False)
    assert second.parent == "s1"

    listed = await snapshots.list_snapshots(running)
    assert [s.name for s in listed] == ["s1", "s2"]
    assert [s.current for s in listed] == [False, True]
    current = await snapshots.current(running)
    assert current is not None
    assert current.name == "s2"
    assert (await snapshots.get(running, "s1")) == listed[0]
    assert await snapshots.get(running, "nope") is None


async def test_snapshot_of_shut_off_domain_has_no_memory(running: Guest) -> None:
    await running.destroy()
    snap = await snapshots.create_snapshot(running, "cold", include_memory=False)
    assert (snap.state, snap.has_memory) == ("shutoff", False)


async def test_revert_restores_state(running: Guest) -> None:
    await snapshots.create_snapshot(running, "warm", include_memory=True)
    await running.destroy()
    assert (await running.status()).state is GuestState.SHUTOFF

    await snapshots.revert(running, "warm")
    status = await running.status()
    assert (status.state, status.reason) == (GuestState.RUNNING, "from-snapshot")
    current = await snapshots.current(running)
    assert current is not None
    assert current.name == "warm"

    await snapshots.revert(running, "warm", running=False)
    assert (await running.status()).state is GuestState.PAUSED
    await snapshots.revert(running, "warm", running=True)
    assert (await running.status()).state is GuestState.RUNNING


async def test_delete(running: Guest) -> None:
    await snapshots.create_snapshot(running, "s1", include_memory=True)
    assert await snapshots.delete(running, "s1") is True
    assert await snapshots.delete(running, "s1") is False
    assert await snapshots.list_snapshots(running) == []


async def test_metadata_only_delete_is_unsupported_on_test_driver(running: Guest) -> None:
    await snapshots.create_snapshot(running, "s1", include_memory=True)
    with pytest.raises(Unsupported):
        await snapshots.delete(running, "s1", metadata_only=True)
    assert [s.name for s in await snapshots.list_snapshots(running)] == ["s1"]


async def test_export_and_redefine_after_metadata_loss(running: Guest) -> None:
    await snapshots.create_snapshot(running, "base", include_memory=True, description="d")
    await snapshots.create_snapshot(running, "next", include_memory=True)
    exported = [await snapshots.export(running, name) for name in ("base", "next")]
    before = await snapshots.list_snapshots(running)
    # Simulate losing libvirt's records (the test driver cannot delete metadata only).
    for name in ("next", "base"):
        await snapshots.delete(running, name)

    seen: list[tuple[str, list[str]]] = []

    def check(xml: str, references: Sequence[str]) -> None:
        seen.append((xml, list(references)))

    await snapshots.redefine(running, exported[0], check=check)
    restored = await snapshots.redefine(running, exported[1], check=check, make_current=True)
    assert restored.current
    after = await snapshots.list_snapshots(running)
    assert [(s.name, s.parent, s.creation_time, s.description) for s in after] == [
        (s.name, s.parent, s.creation_time, s.description) for s in before
    ]
    # The check saw each XML with the domain as it is now: live and persistent definition.
    assert [xml for xml, _ in seen] == exported
    live, persistent = seen[0][1]
    assert UID in live
    assert UID in persistent


async def test_a_refusing_check_stops_the_redefine(running: Guest) -> None:
    """Whatever the check raises, libvirt never sees the XML (status is not trusted)."""
    await snapshots.create_snapshot(running, "base", include_memory=True)
    exported = await snapshots.export(running, "base")
    await snapshots.delete(running, "base")

    def refuse(xml: str, references: Sequence[str]) -> None:
        raise ValueError("not ours")

    with pytest.raises(ValueError, match="not ours"):
        await snapshots.redefine(running, exported, check=refuse)
    assert await snapshots.list_snapshots(running) == []


async def test_disk_only_is_unsupported_on_test_driver(running: Guest) -> None:
    with pytest.raises(Unsupported):
        await snapshots.create_snapshot(running, "d", include_memory=False, disk_only=True)


async def test_quiesce_flag_is_passed(running: Guest) -> None:
    # The test driver accepts QUIESCE. VMSnapshot's quiesce does not use this flag (QEMU
    # allows it for disk-only snapshots only): the agent freezes through the guest agent.
    snap = await snapshots.create_snapshot(running, "q", include_memory=True, quiesce=True)
    assert snap.name == "q"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden"])
async def test_snapshot_names_are_checked(running: Guest, name: str) -> None:
    with pytest.raises(InvalidName):
        await snapshots.create_snapshot(running, name, include_memory=True)
    with pytest.raises(InvalidName):
        await snapshots.revert(running, name)
    with pytest.raises(InvalidName):
        await snapshots.redefine(
            running,
            f"<domainsnapshot><name>{name}</name></domainsnapshot>",
            check=lambda xml, references: None,
        )


def test_snapshot_xml_shape() -> None:
    root = etree.fromstring(
        snapshots.snapshot_xml("s", include_memory=True, description="a<b").encode()
    )
    assert root.tag == "domainsnapshot"
    assert root.findtext("name") == "s"
    assert root.findtext("description") == "a<b"
    assert attr(root, "memory", "snapshot") == "internal"
    no_mem = etree.fromstring(snapshots.snapshot_xml("s", include_memory=False).encode())
    assert attr(no_mem, "memory", "snapshot") == "no"
    assert no_mem.find("description") is None
    with pytest.raises(ValueError, match="disk-only"):
        snapshots.snapshot_xml("s", include_memory=True, disk_only=True)


def test_parse_disk_only_snapshot() -> None:
    info = snapshots.parse_snapshot(
        "<domainsnapshot><name>d</name><state>disk-snapshot</state>"
        "<parent><name>p</name></parent><creationTime>12</creationTime>"
        "<memory snapshot='no'/></domainsnapshot>"
    )
    assert (info.disk_only, info.has_memory, info.parent, info.creation_time) == (
        True,
        False,
        "p",
        12,
    )
