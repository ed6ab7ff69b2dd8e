"""The controller's decisions about backups: pure functions, no I/O.

- when a VMBackupLocation is checked again;
- whether a VMBackup may go (no later incremental depends on it);
- what a restore from a backup does next, and the VirtualMachine it creates.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from virtfleet.api.backup import BackupPhase
from virtfleet.api.base import DNS_SUBDOMAIN_PATTERN
from virtfleet.api.conditions import parse_rfc3339
from virtfleet.api.snapshot import RestorePhase
from virtfleet.identity import NODE_LABEL

DEFAULT_CHECK_SECONDS = 60.0
#: A location that failed its check is looked at again this soon (bounded by its interval).
UNAVAILABLE_RECHECK_SECONDS = 10.0
RESTORED_FROM = "virtfleet.io/restored-from-backup"
#: On VMBackups a location found in its bucket: the location's name.
SYNCED_FROM = "virtfleet.io/synced-from-location"
RESTORE_UID = "virtfleet.io/restore-uid"


def seconds_until_check(
    status: Mapping[str, Any], generation: int | None, now: datetime, interval: float
) -> float:
    """0 when the location should be checked now; else how long until it should."""
    if status.get("observedGeneration") != generation or not status.get("lastCheckedTime"):
        return 0.0
    if status.get("phase") != "Available":
        interval = min(interval, UNAVAILABLE_RECHECK_SECONDS)
    elapsed = (now - parse_rfc3339(str(status["lastCheckedTime"]))).total_seconds()
    return max(0.0, interval - elapsed)


def dependents(name: str, namespace: str, backups: Iterable[Mapping[str, Any]]) -> list[str]:
    """Backups (not being deleted themselves) whose chain goes through ``name``."""
    return sorted(
        str(b["metadata"]["name"])
        for b in backups
        if b["metadata"].get("namespace") == namespace
        and (b.get("status") or {}).get("parent") == name
        and not b["metadata"].get("deletionTimestamp")
    )


@dataclass(frozen=True)
class RestoreWait:
    reason: str
    message: str


@dataclass(frozen=True)
class RestoreFail:
    reason: str
    message: str


@dataclass(frozen=True)
class RestoreCreateVM:
    pass


@dataclass(frozen=True)
class RestoreProgress:
    message: str


@dataclass(frozen=True)
class RestoreDone:
    message: str


@dataclass(frozen=True)
class RestoreNothing:
    pass


RestoreAction = (
    RestoreWait | RestoreFail | RestoreCreateVM | RestoreProgress | RestoreDone | RestoreNothing
)


def decide_restore(
    restore: Mapping[str, Any],
    backup: Mapping[str, Any] | None,
    vm: Mapping[str, Any] | None,
) -> RestoreAction:
    """A restore from a backup creates the VM ``spec.vmName`` once, then waits until it runs;
    into an existing VM it is the agent's of the VM's node."""
    status = restore.get("status") or {}
    spec = restore.get("spec") or {}
    if status.get("phase") in (RestorePhase.SUCCEEDED.value, RestorePhase.FAILED.value):
        return RestoreNothing()
    uid = str(restore["metadata"].get("uid"))
    vm_name = str(spec.get("vmName"))
    if vm is not None:
        ours = (vm["metadata"].get("annotations") or {}).get(RESTORE_UID) == uid
        if not ours:
            # An existing VM: its node's agent replaces its disks (agent.backups.inplace,
            # rules in reconcile.backup_inplace), once the controller has placed it.
            if not (vm["metadata"].get("labels") or {}).get(NODE_LABEL):
                return RestoreWait(
                    "VMNotPlaced",
                    f"VirtualMachine {vm_name} exists but is on no node yet; its disks are "
                    "replaced by its node's agent",
                )
            return RestoreNothing()
        vm_status = vm.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in vm_status.get("conditions") or []
        )
        if ready and vm_status.get("printableStatus") in ("Running", "Stopped"):
            return RestoreDone(
                f"VirtualMachine {vm_name} restored from VMBackup {spec.get('backupName')} "
                f"on node {vm_status.get('nodeName')}"
            )
        return RestoreProgress(f"VirtualMachine {vm_name} created; waiting for it to be Ready")
    if status.get("vmCreated") or status.get("vmUID"):
        # Made by this restore, or the existing VM its agent was restoring into: either
        # way not one to make (again) from the backup.
        return RestoreFail("VMDeleted", f"VirtualMachine {vm_name} was deleted during the restore")
    if backup is None:
        return RestoreWait("BackupNotFound", f"VMBackup {spec.get('backupName')} does not exist")
    phase = (backup.get("status") or {}).get("phase")
    if phase == BackupPhase.FAILED.value:
        return RestoreFail("BackupFailed", f"VMBackup {spec.get('backupName')} failed")
    if phase != BackupPhase.COMPLETED.value:
        return RestoreWait(
            "BackupNotCompleted", f"VMBackup {spec.get('backupName')} is {phase or 'Pending'}"
        )
    if backup["metadata"].get("deletionTimestamp"):
        return RestoreFail("BackupDeleting", f"VMBackup {spec.get('backupName')} is being deleted")
    return RestoreCreateVM()


def restored_vm(
    restore: Mapping[str, Any], backup_name: str, manifest: Mapping[str, Any]
) -> dict[str, Any]:
    """The new VirtualMachine: the backed-up VM's spec with every backed-up disk's source
    the backup, no node pin (any node may take it, unless the restore names one) and no
    fixed MAC (a new VM, new MACs)."""
    vm = manifest.get("vm") or {}
    spec = copy.deepcopy(vm.get("spec") or {})
    saved = {str(d.get("name")) for d in manifest.get("disks") or []}
    for disk in spec.get("disks") or []:
        if disk.get("name") in saved:
            disk["source"] = {"backup": {"backupName": backup_name, "disk": disk["name"]}}
    spec.pop("nodeName", None)
    if (restore.get("spec") or {}).get("nodeName"):
        spec["nodeName"] = restore["spec"]["nodeName"]
    for nic in spec.get("interfaces") or []:
        nic.pop("macAddress", None)
    labels = {
        k: v for k, v in (vm.get("labels") or {}).items() if not str(k).startswith("virtfleet.io/")
    }
    meta = restore["metadata"]
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": restore["spec"]["vmName"],
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {RESTORED_FROM: backup_name, RESTORE_UID: str(meta["uid"])},
        },
        "spec": spec,
    }


def synced_name(manifest_key: str, base: str) -> str | None:
    """The backup's name from a manifest's key under ``base`` (``.../backups/<ns>/``);
    None for keys elsewhere or names that are not valid object names."""
    if not manifest_key.startswith(base) or not manifest_key.endswith("/manifest.json"):
        return None
    name = manifest_key[len(base) : -len("/manifest.json")]
    if not re.fullmatch(DNS_SUBDOMAIN_PATTERN, name) or len(name) > 253:
        return None
    return name


def synced_backup(
    namespace: str, location: str, name: str, prefix: str, manifest: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A read-only VMBackup (object, then status) for a backup found in the bucket."""
    vm = manifest.get("vm") or {}
    disks = [
        {k: d[k] for k in ("name", "objectKey", "virtualSize", "uploadedBytes", "sha256") if k in d}
        for d in manifest.get("disks") or []
    ]
    uploaded = sum(int(d.get("uploadedBytes") or 0) for d in disks)
    body = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMBackup",
        "metadata": {"name": name, "namespace": namespace, "labels": {SYNCED_FROM: location}},
        "spec": {
            "vmName": str(vm.get("name") or "unknown"),
            "location": location,
            "mode": "Incremental" if manifest.get("type") == "Incremental" else "Full",
            "deletionPolicy": "Retain",
        },
    }
    status = {
        "phase": BackupPhase.COMPLETED.value,
        "synced": True,
        "type": manifest.get("type"),
        "parent": manifest.get("parent"),
        "objectPrefix": prefix,
        "vmUID": vm.get("uid"),
        "disks": disks,
        "sizeBytes": sum(int(d.get("virtualSize") or 0) for d in disks),
        "uploadedBytes": uploaded,
        "progress": {"bytesTotal": uploaded, "bytesDone": uploaded, "percent": 100},
        "startTime": manifest.get("startTime"),
        "completionTime": manifest.get("completionTime"),
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Synced",
                "message": f"found in the bucket of VMBackupLocation {location}",
                "lastTransitionTime": manifest.get("completionTime") or "1970-01-01T00:00:00Z",
            }
        ],
    }
    return body, status
