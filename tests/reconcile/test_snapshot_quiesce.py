"""Quiesced snapshots: disks-only, the freeze's outcome read back from libvirt, a thaw
after every freeze, and KubeVirt's indications — without a guest or libvirt."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from virtfleet.api.snapshot import (
    SnapshotIndication,
    SnapshotPhase,
    VMSnapshotSpec,
    VMSnapshotStatus,
)
from virtfleet.api.virtualmachine import RunStrategy
from virtfleet.reconcile.quiesce import QuiesceOutcome, describe, read_outcome
from virtfleet.reconcile.snapshot import TakeSnapshot, ThawFilesystems, decide_snapshot
from virtfleet.reconcile.snapshot_types import (
    DomainFacts,
    LibvirtSnapshot,
    SnapshotView,
    VmRef,
    libvirt_snapshot_name,
)
from virtfleet.reconcile.vm import Power

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
UID = "5a5a5a5a-0000-4000-8000-000000000002"
NAME = libvirt_snapshot_name(UID)
VM = VmRef(name="vm", uid="11111111-2222-4333-8444-555555555555", run_strategy=RunStrategy.ALWAYS)
RUNNING = DomainFacts(defined=True, power=Power.RUNNING, reason="booted")
INTENT = VMSnapshotStatus(phase=SnapshotPhase.IN_PROGRESS, memory_included=False)


def view(status: VMSnapshotStatus | None = None, **spec: object) -> SnapshotView:
    return SnapshotView(
        namespace="ns",
        name="s",
        uid=UID,
        generation=1,
        created=NOW,
        spec=VMSnapshotSpec.model_validate({"vmName": "vm", **spec}),
        status=status or VMSnapshotStatus(),
        deleting=False,
        adopted=True,
    )


def taken(
    outcome: QuiesceOutcome | None, error: str | None = None, *, power: Power = Power.RUNNING
) -> DomainFacts:
    info = LibvirtSnapshot(
        NAME, "running", True, int(NOW.timestamp()), describe("ns", "s", UID, outcome, error)
    )
    return DomainFacts(defined=True, power=power, reason="booted", snapshot=info)


def test_quiesce_with_memory_is_refused_with_a_way_out() -> None:
    with pytest.raises(ValidationError, match="set includeMemory: false or drop quiesce"):
        VMSnapshotSpec.model_validate({"vmName": "vm", "quiesce": True, "includeMemory": True})


def test_quiesce_means_a_disks_only_snapshot_of_a_running_vm() -> None:
    d = decide_snapshot(view(quiesce=True), VM, RUNNING, "node-a", NOW)
    # libvirt still saves memory (QEMU needs it for an internal snapshot of a running VM);
    # the promise — what a restore brings back — is disks only.
    assert d.actions == (TakeSnapshot(NAME, memory=True, quiesce=True),)
    assert d.status.memory_included is False
    assert d.write_status_first


def test_a_quiesced_snapshot_is_ready_quiesced_and_thaws_the_guest_again() -> None:
    d = decide_snapshot(view(INTENT, quiesce=True), VM, taken(QuiesceOutcome.QUIESCED), "n", NOW)
    assert d.status.phase is SnapshotPhase.READY
    assert d.status.quiesced is True
    assert d.status.indications == [SnapshotIndication.ONLINE, SnapshotIndication.GUEST_AGENT]
    assert ThawFilesystems() in d.actions
    assert [e.reason for e in d.events] == ["SnapshotTaken"]
    assert "(quiesced)" in d.events[0].message


def test_without_an_agent_it_is_taken_and_says_so() -> None:
    d = decide_snapshot(
        view(INTENT, quiesce=True), VM, taken(QuiesceOutcome.NO_GUEST_AGENT), "n", NOW
    )
    assert d.status.phase is SnapshotPhase.READY
    assert d.status.quiesced is False
    assert d.status.indications == [SnapshotIndication.ONLINE, SnapshotIndication.NO_GUEST_AGENT]
    assert ThawFilesystems() not in d.actions  # nothing was frozen
    warning = next(e for e in d.events if e.type == "Warning")
    assert warning.reason == "NoGuestAgent"


def test_a_failed_freeze_is_reported_and_still_thawed() -> None:
    dom = taken(QuiesceOutcome.QUIESCE_FAILED, "guest agent is not responding")
    d = decide_snapshot(view(INTENT, quiesce=True), VM, dom, "n", NOW)
    assert d.status.quiesced is False
    assert SnapshotIndication.QUIESCE_FAILED in d.status.indications
    assert ThawFilesystems() in d.actions  # a freeze that failed may have frozen some
    warning = next(e for e in d.events if e.type == "Warning")
    assert (warning.reason, "not responding" in warning.message) == ("QuiesceFailed", True)


def test_no_thaw_once_the_guest_is_off() -> None:
    dom = taken(QuiesceOutcome.QUIESCED, power=Power.STOPPED)
    d = decide_snapshot(view(INTENT, quiesce=True), VM, dom, "n", NOW)
    assert ThawFilesystems() not in d.actions
    assert d.status.quiesced is True


def test_a_snapshot_without_quiesce_says_nothing_of_it() -> None:
    intent = VMSnapshotStatus(phase=SnapshotPhase.IN_PROGRESS, memory_included=True)
    d = decide_snapshot(view(intent), VM, taken(None), "n", NOW)
    assert d.status.quiesced is None
    assert d.status.indications == [SnapshotIndication.ONLINE]
    assert d.actions == ()


@pytest.mark.parametrize("text", [None, "", "free text", "[1]", '{"quiesce": "Maybe"}'])
def test_descriptions_from_others_read_as_no_outcome(text: str | None) -> None:
    assert read_outcome(text) == (None, None)


def test_the_outcome_survives_the_description_round_trip() -> None:
    text = describe("ns", "s", UID, QuiesceOutcome.QUIESCE_FAILED, "x" * 1000)
    outcome, error = read_outcome(text)
    assert outcome is QuiesceOutcome.QUIESCE_FAILED
    assert error == "x" * 300
