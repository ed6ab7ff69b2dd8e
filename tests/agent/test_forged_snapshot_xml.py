"""A snapshot XML in status that virtfleet did not take is never redefined, only refused.

libvirt lost the snapshot's metadata, so the next restore (or the snapshot's own Ready
check) would redefine it from ``status.snapshotXML`` — which here was rewritten to carry a
host device. Both loops refuse with ``UnsafeSnapshotXML`` (Failed, Stalled, a Warning
Event) and libvirt never sees the document; the untouched XML still redefines.
"""

from __future__ import annotations

import pytest
from tests.agent import test_snapshots
from tests.agent.test_snapshots import VM_UID, add

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.snapshot.agent import SnapshotAgent
from virtfleet.agent.snapshot.redefine import UNSAFE_SNAPSHOT_XML
from virtfleet.hypervisor import Guest, Hypervisor, snapshots

#: The agent on the test driver with a running VM (the snapshot tests' fixture).
setup = test_snapshots.setup
HOSTDEV = "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>"  # noqa: E501


def stalled(status: dict[str, object]) -> str | None:
    conditions = status.get("conditions") or []
    assert isinstance(conditions, list)
    return next((c["reason"] for c in conditions if c["type"] == "Stalled"), None)


@pytest.fixture
async def lost(
    setup: tuple[Agent, SnapshotAgent, FakeKube], hv: Hypervisor
) -> tuple[SnapshotAgent, FakeKube, Guest, str]:
    """A Ready snapshot whose libvirt metadata is gone; returns its stored XML."""
    _, snaps, kube = setup
    add(kube, snaps, "VMSnapshot", "s1", {"vmName": "vm"})
    await snaps.reconcile_snapshot(("ns", "s1"))
    status = (await kube.get("VMSnapshot", "ns", "s1"))["status"]
    assert status["phase"] == "Ready"
    guest = await hv.lookup(VM_UID)
    assert guest is not None
    await snapshots.delete(guest, status["snapshotName"])
    return snaps, kube, guest, str(status["snapshotXML"])


async def forge(snaps: SnapshotAgent, kube: FakeKube, xml: str) -> None:
    body = await kube.patch_status("VMSnapshot", "ns", "s1", {"snapshotXML": xml})
    snaps.on_snapshot_event("MODIFIED", body)


async def test_a_restore_refuses_a_forged_snapshot_xml(
    lost: tuple[SnapshotAgent, FakeKube, Guest, str],
) -> None:
    snaps, kube, guest, xml = lost
    await forge(snaps, kube, xml.replace("<devices>", f"<devices>{HOSTDEV}", 1))
    add(kube, snaps, "VMRestore", "r1", {"vmName": "vm", "snapshotName": "s1"})
    await snaps.reconcile_restores(("ns", "vm"))
    status = (await kube.get("VMRestore", "ns", "r1"))["status"]
    assert status["phase"] == "Failed"
    assert stalled(status) == UNSAFE_SNAPSHOT_XML
    assert "hostdev" in status["error"]["message"]
    assert ("r1", UNSAFE_SNAPSHOT_XML) in kube.events
    assert await snapshots.list_snapshots(guest) == []  # never redefined
    assert await snapshots.restore_marker(guest) is None  # nor marked for a revert


async def test_the_ready_check_refuses_it_too_and_says_nothing_was_redefined(
    lost: tuple[SnapshotAgent, FakeKube, Guest, str],
) -> None:
    snaps, kube, guest, xml = lost
    await forge(snaps, kube, xml.replace("/serial/ns_vm.log", "/etc/shadow"))
    await snaps.reconcile_snapshot(("ns", "s1"))
    status = (await kube.get("VMSnapshot", "ns", "s1"))["status"]
    assert status["phase"] == "Failed"
    assert stalled(status) == UNSAFE_SNAPSHOT_XML
    assert ("s1", UNSAFE_SNAPSHOT_XML) in kube.events
    assert ("s1", "SnapshotRedefined") not in kube.events
    assert await snapshots.list_snapshots(guest) == []


async def test_the_stored_xml_itself_is_redefined(
    lost: tuple[SnapshotAgent, FakeKube, Guest, str],
) -> None:
    snaps, kube, guest, _ = lost
    await snaps.reconcile_snapshot(("ns", "s1"))
    assert [s.name for s in await snapshots.list_snapshots(guest)] != []
    assert ("s1", "SnapshotRedefined") in kube.events
