"""The controller's backup decisions: location re-checks, deletion guard, restore as a new VM."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.api.backup import VMBackupStatus
from virtfleet.api.conditions import rfc3339
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.backupstore.s3 import namespace_prefix
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.backup_control import (
    RESTORE_UID,
    RESTORED_FROM,
    SYNCED_FROM,
    UNAVAILABLE_RECHECK_SECONDS,
    RestoreCreateVM,
    RestoreDone,
    RestoreFail,
    RestoreNothing,
    RestoreProgress,
    RestoreWait,
    decide_restore,
    dependents,
    restored_vm,
    seconds_until_check,
    synced_backup,
    synced_name,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RESTORE_ID = "7e7e7e7e-0000-4000-8000-000000000001"

# --- seconds_until_check ---------------------------------------------------------------------


def location(phase: str | None, checked_ago: float | None, generation: int = 2) -> dict[str, Any]:
    status: dict[str, Any] = {"observedGeneration": generation}
    if phase is not None:
        status["phase"] = phase
    if checked_ago is not None:
        status["lastCheckedTime"] = rfc3339(NOW - timedelta(seconds=checked_ago))
    return status


def test_a_changed_spec_is_checked_at_once() -> None:
    """A new generation (new endpoint, new credentials) must not wait for the interval."""
    status = location("Available", checked_ago=1, generation=1)
    assert seconds_until_check(status, 2, NOW, 60.0) == 0.0


def test_a_never_checked_location_is_checked_at_once() -> None:
    """No lastCheckedTime: there is nothing to wait for."""
    assert seconds_until_check(location(None, None), 2, NOW, 60.0) == 0.0


def test_an_available_location_waits_out_its_interval() -> None:
    """Checked 20 s ago with a 60 s interval: 40 s to go."""
    assert seconds_until_check(location("Available", 20), 2, NOW, 60.0) == pytest.approx(40.0)


def test_an_overdue_check_is_due_now_not_negative() -> None:
    """Past the interval the wait is 0, never negative."""
    assert seconds_until_check(location("Available", 600), 2, NOW, 60.0) == 0.0


@pytest.mark.parametrize("phase", ["Unavailable", None])
def test_an_unavailable_location_is_rechecked_sooner(phase: str | None) -> None:
    """A failing (or not yet judged) location is looked at again within the short recheck."""
    wait = seconds_until_check(location(phase, 3), 2, NOW, 3600.0)
    assert wait == pytest.approx(UNAVAILABLE_RECHECK_SECONDS - 3)


def test_a_short_interval_bounds_the_unavailable_recheck() -> None:
    """The recheck is never slower than the location's own interval."""
    assert seconds_until_check(location("Unavailable", 2), 2, NOW, 5.0) == pytest.approx(3.0)


@given(
    phase=st.sampled_from(["Available", "Unavailable"]),
    ago=st.integers(0, 10_000),
    interval=st.floats(1.0, 86_400.0),
)
def test_the_wait_is_never_longer_than_the_interval(phase: str, ago: int, interval: float) -> None:
    """Whatever the last check, the next one is at most one interval away."""
    wait = seconds_until_check(location(phase, ago), 2, NOW, interval)
    assert 0.0 <= wait <= interval
    if phase != "Available":
        assert wait <= UNAVAILABLE_RECHECK_SECONDS


# --- dependents ------------------------------------------------------------------------------


def backup_obj(
    name: str,
    *,
    namespace: str = "ns",
    parent: str | None = None,
    deleting: bool = False,
    phase: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if deleting:
        meta["deletionTimestamp"] = rfc3339(NOW)
    status: dict[str, Any] = {}
    if parent is not None:
        status["parent"] = parent
    if phase is not None:
        status["phase"] = phase
    obj: dict[str, Any] = {"metadata": meta}
    if status:
        obj["status"] = status
    return obj


def test_dependents_are_the_children_in_the_same_namespace() -> None:
    """Only incrementals built directly on this backup, in its namespace, hold it; sorted."""
    backups = [
        backup_obj("full"),
        backup_obj("inc-b", parent="full"),
        backup_obj("inc-a", parent="full"),
        backup_obj("other-ns", namespace="elsewhere", parent="full"),
        backup_obj("grandchild", parent="inc-a"),
        backup_obj("gone", parent="full", deleting=True),
        {"metadata": {"name": "nostatus", "namespace": "ns"}, "status": None},
    ]
    assert dependents("full", "ns", backups) == ["inc-a", "inc-b"]


def test_a_backup_without_children_has_no_dependents() -> None:
    """The newest backup of a chain may always go."""
    backups = [backup_obj("full"), backup_obj("inc", parent="full")]
    assert dependents("inc", "ns", backups) == []


# --- decide_restore --------------------------------------------------------------------------


def restore_obj(phase: str | None = None, *, vm_created: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if vm_created:
        status["vmCreated"] = True
    return {
        "metadata": {"name": "r", "namespace": "ns", "uid": RESTORE_ID},
        "spec": {"vmName": "web-restored", "backupName": "nightly-2"},
        "status": status,
    }


def completed_backup(*, deleting: bool = False) -> dict[str, Any]:
    return backup_obj("nightly-2", phase="Completed", deleting=deleting)


def vm_obj(
    *,
    restore_uid: str | None = RESTORE_ID,
    ready: str | None = "True",
    printable: str | None = "Running",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web-restored", "namespace": "ns"}
    if restore_uid is not None:
        meta["annotations"] = {RESTORE_UID: restore_uid}
    status: dict[str, Any] = {"nodeName": "node-b"}
    if ready is not None:
        status["conditions"] = [
            {"type": "Reconciling", "status": "True"},
            {"type": "Ready", "status": ready},
        ]
    if printable is not None:
        status["printableStatus"] = printable
    return {"metadata": meta, "status": status}


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_restore_does_nothing(phase: str) -> None:
    """A finished restore is final, even if its VM later disappears."""
    assert decide_restore(restore_obj(phase, vm_created=True), None, None) == RestoreNothing()


@pytest.mark.parametrize("restore_uid", [None, "another-restore"])
def test_an_existing_placed_vm_is_left_to_its_agent(restore_uid: str | None) -> None:
    """A VM the restore did not create has its disks replaced in place by its node's agent
    (which also refuses a backup of another VM): the controller says nothing."""
    vm = vm_obj(restore_uid=restore_uid, ready=None)
    vm["metadata"]["labels"] = {NODE_LABEL: "node-b"}
    assert decide_restore(restore_obj(), completed_backup(), vm) == RestoreNothing()


def test_an_existing_unplaced_vm_waits_with_the_reason() -> None:
    """No node, no agent to replace its disks: Pending says why, not silence."""
    action = decide_restore(restore_obj(), completed_backup(), vm_obj(restore_uid=None))
    assert isinstance(action, RestoreWait)
    assert action.reason == "VMNotPlaced"
    assert "web-restored" in action.message


@pytest.mark.parametrize("printable", ["Running", "Stopped"])
def test_our_ready_vm_means_done(printable: str) -> None:
    """Ready and settled (Running, or Stopped on purpose): the restore succeeded."""
    action = decide_restore(
        restore_obj("InProgress", vm_created=True), completed_backup(), vm_obj(printable=printable)
    )
    assert isinstance(action, RestoreDone)
    assert "node-b" in action.message
    assert "nightly-2" in action.message


@pytest.mark.parametrize(
    ("ready", "printable"),
    [("False", "Running"), (None, "Running"), ("True", "Provisioning"), ("True", None)],
    ids=["not-ready", "no-conditions", "still-provisioning", "no-printable-status"],
)
def test_our_vm_not_ready_yet_is_progress(ready: str | None, printable: str | None) -> None:
    """The VM exists (ours) but is not settled: keep waiting, don't create it again."""
    action = decide_restore(
        restore_obj("InProgress", vm_created=True),
        completed_backup(),
        vm_obj(ready=ready, printable=printable),
    )
    assert isinstance(action, RestoreProgress)


def test_our_vm_is_found_even_when_the_backup_is_gone() -> None:
    """Once the VM exists the backup is no longer needed to finish."""
    action = decide_restore(restore_obj("InProgress", vm_created=True), None, vm_obj())
    assert isinstance(action, RestoreDone)


def test_a_vm_deleted_after_creation_fails_the_restore() -> None:
    """Not created twice: the user deleted the restored VM mid-restore."""
    action = decide_restore(restore_obj("InProgress", vm_created=True), completed_backup(), None)
    assert isinstance(action, RestoreFail)
    assert action.reason == "VMDeleted"


@pytest.mark.parametrize("phase", ["Pending", "InProgress"])
def test_a_vm_deleted_during_an_in_place_restore_is_not_made_from_the_backup(phase: str) -> None:
    """The agent recorded which existing VM it restores into (vmUID): that VM deleted is a
    failure, not a request for a new VM from the backup."""
    restore = restore_obj(phase)
    restore["status"]["vmUID"] = "old-vm-uid"
    action = decide_restore(restore, completed_backup(), None)
    assert isinstance(action, RestoreFail)
    assert action.reason == "VMDeleted"


def test_a_missing_backup_is_waited_for() -> None:
    """The backup may be synced from the bucket later: wait, don't fail."""
    action = decide_restore(restore_obj(), None, None)
    assert isinstance(action, RestoreWait)
    assert action.reason == "BackupNotFound"
    assert "nightly-2" in action.message


def test_a_failed_backup_fails_the_restore() -> None:
    """A failed backup will never be restorable."""
    action = decide_restore(restore_obj(), backup_obj("nightly-2", phase="Failed"), None)
    assert isinstance(action, RestoreFail)
    assert action.reason == "BackupFailed"


@pytest.mark.parametrize(
    ("phase", "shown"),
    [("InProgress", "InProgress"), ("Uploading", "Uploading"), (None, "Pending")],
)
def test_an_unfinished_backup_is_waited_for(phase: str | None, shown: str) -> None:
    """Restoring waits until the backup completes; the message says where it is."""
    action = decide_restore(restore_obj(), backup_obj("nightly-2", phase=phase), None)
    assert isinstance(action, RestoreWait)
    assert action.reason == "BackupNotCompleted"
    assert action.message.endswith(f"is {shown}")


def test_a_backup_being_deleted_cannot_be_restored() -> None:
    """Its objects are going away: refuse rather than race the deletion."""
    action = decide_restore(restore_obj(), completed_backup(deleting=True), None)
    assert isinstance(action, RestoreFail)
    assert action.reason == "BackupDeleting"


@pytest.mark.parametrize("phase", [None, "Pending", "InProgress"])
def test_a_completed_backup_creates_the_vm(phase: str | None) -> None:
    """Everything in place and no VM yet: create it."""
    assert decide_restore(restore_obj(phase), completed_backup(), None) == RestoreCreateVM()


# --- restored_vm -----------------------------------------------------------------------------


def manifest() -> dict[str, Any]:
    return {
        "vm": {
            "name": "web",
            "uid": "old-vm-uid",
            "labels": {
                "app": "web",
                "virtfleet.io/node": "node-a",
                "virtfleet.io/anything": "x",
            },
            "spec": {
                "runStrategy": "Always",
                "nodeName": "node-a",
                "nodeSelector": {"zone": "a"},
                "memory": {"size": "128Mi"},
                "disks": [
                    {"name": "root", "source": {"image": "debian-12"}, "size": "2Gi"},
                    {"name": "data", "size": "64Mi", "source": {"blank": {}}},
                    {"name": "iso", "readOnly": True, "source": {"image": "tools.iso"}},
                ],
                "interfaces": [
                    {"name": "default", "type": "user", "macAddress": "52:54:00:12:34:56"},
                    {"name": "lan", "type": "bridge", "bridge": "br0"},
                ],
            },
        },
        "disks": [{"name": "root", "objectKey": "k/root"}, {"name": "data", "objectKey": "k/d"}],
    }


def restore_for_vm() -> dict[str, Any]:
    return {
        "metadata": {"name": "r", "namespace": "prod", "uid": RESTORE_ID},
        "spec": {"vmName": "web-restored", "backupName": "nightly-2"},
    }


def test_saved_disks_come_from_the_backup_and_others_keep_their_source() -> None:
    """Disks with data in the backup are restored from it; a read-only ISO stays an image."""
    vm = restored_vm(restore_for_vm(), "nightly-2", manifest())
    sources = {d["name"]: d["source"] for d in vm["spec"]["disks"]}
    assert sources == {
        "root": {"backup": {"backupName": "nightly-2", "disk": "root"}},
        "data": {"backup": {"backupName": "nightly-2", "disk": "data"}},
        "iso": {"image": "tools.iso"},
    }
    assert vm["spec"]["disks"][0]["size"] == "2Gi"


def test_the_new_vm_has_no_node_pin_and_no_fixed_macs() -> None:
    """Any node may take it, and a new VM gets new MACs; other fields are kept."""
    vm = restored_vm(restore_for_vm(), "nightly-2", manifest())
    spec = vm["spec"]
    assert "nodeName" not in spec
    assert spec["nodeSelector"] == {"zone": "a"}
    assert all("macAddress" not in nic for nic in spec["interfaces"])
    assert [nic["name"] for nic in spec["interfaces"]] == ["default", "lan"]
    assert spec["interfaces"][1]["bridge"] == "br0"


def test_a_restore_naming_a_node_pins_the_new_vm_there() -> None:
    """The restore's nodeName replaces the backed-up VM's pin (not kept from the manifest)."""
    restore = restore_for_vm()
    restore["spec"]["nodeName"] = "node-c"
    vm = restored_vm(restore, "nightly-2", manifest())
    assert vm["spec"]["nodeName"] == "node-c"


def test_the_new_vm_drops_virtfleet_labels_and_records_its_restore() -> None:
    """virtfleet.io/* labels (placement) are the operator's; annotations link to the restore."""
    vm = restored_vm(restore_for_vm(), "nightly-2", manifest())
    assert vm["apiVersion"] == "virtfleet.io/v1alpha1"
    assert vm["kind"] == "VirtualMachine"
    assert vm["metadata"] == {
        "name": "web-restored",
        "namespace": "prod",
        "labels": {"app": "web"},
        "annotations": {RESTORED_FROM: "nightly-2", RESTORE_UID: RESTORE_ID},
    }


def test_the_new_vm_is_recognised_as_the_restores_own() -> None:
    """decide_restore must see the VM restored_vm made as ours, not as a VMExists conflict."""
    vm = restored_vm(restore_for_vm(), "nightly-2", manifest())
    restore = {**restore_for_vm(), "status": {"vmCreated": True}}
    assert isinstance(decide_restore(restore, completed_backup(), vm), RestoreProgress)


def test_the_new_vm_spec_is_valid() -> None:
    """The VirtualMachine created must pass the API's own validation (one disk source each)."""
    vm = restored_vm(restore_for_vm(), "nightly-2", manifest())
    spec = VirtualMachineSpec.model_validate(vm["spec"])
    assert spec.node_name is None
    assert spec.disks[0].source.backup is not None
    assert spec.disks[0].source.image is None


def test_the_manifest_is_not_modified() -> None:
    """The manifest may be cached and reused: restored_vm works on a copy."""
    original = manifest()
    kept = copy.deepcopy(original)
    restored_vm(restore_for_vm(), "nightly-2", original)
    assert original == kept


def test_an_empty_manifest_gives_an_empty_spec() -> None:
    """A manifest without a VM section still yields a well-formed object (no crash)."""
    vm = restored_vm(restore_for_vm(), "nightly-2", {})
    assert vm["spec"] == {}
    assert vm["metadata"]["labels"] == {}


# --- backup sync (a location finds backups in its bucket) ------------------------------------


def test_synced_name_reads_the_backup_from_a_manifest_key_of_this_namespace() -> None:
    """Only this namespace's manifests, and only names Kubernetes accepts, become objects."""
    base = namespace_prefix("cluster-a", "shop")
    assert base == "cluster-a/backups/shop/"
    assert synced_name(f"{base}nightly-1/manifest.json", base) == "nightly-1"
    assert synced_name("cluster-a/backups/other/nightly-1/manifest.json", base) is None
    assert synced_name(f"{base}nightly-1/disks/root.qcow2", base) is None
    assert synced_name(f"{base}Not_Valid/manifest.json", base) is None
    assert synced_name(f"{base}a/b/manifest.json", base) is None


def test_a_synced_backup_is_completed_read_only_and_keeps_the_manifests_facts() -> None:
    """Retain: deleting the mirror never deletes another cluster's data."""
    manifest = {
        "type": "Incremental",
        "parent": "nightly-0",
        "completionTime": "2026-12-01T00:00:00Z",
        "vm": {"name": "web", "uid": "u-1"},
        "disks": [
            {"name": "root", "objectKey": "k", "virtualSize": 10, "uploadedBytes": 4, "sha256": "s"}
        ],
    }
    body, status = synced_backup("shop", "main", "nightly-1", "p/nightly-1/", manifest)
    assert body["spec"] == {
        "vmName": "web",
        "location": "main",
        "mode": "Incremental",
        "deletionPolicy": "Retain",
    }
    assert body["metadata"]["labels"] == {SYNCED_FROM: "main"}
    assert status["phase"] == "Completed"
    assert status["synced"] is True
    assert status["parent"] == "nightly-0"
    assert status["objectPrefix"] == "p/nightly-1/"
    assert (status["sizeBytes"], status["uploadedBytes"]) == (10, 4)
    VMBackupStatus.model_validate(status)  # what the apiserver's schema will hold
