"""Which VMs of a fenced node fail over, and what their status says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from virtfleet.api.virtualmachine import HighAvailability, VirtualMachineSpec
from virtfleet.reconcile import failover as fo

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
SHARED = {"virtfleet-shared"}


def spec(policy: str, *disks: dict[str, Any]) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(
        {"memory": {"size": "128Mi"}, "highAvailability": policy, "disks": list(disks)}
    )


def disk(name: str, pool: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "size": "1Gi", "source": {"blank": {}}, "pool": pool, **extra}


def test_none_is_the_default_and_stays() -> None:
    default = VirtualMachineSpec.model_validate({"memory": {"size": "1Gi"}})
    assert default.high_availability is HighAvailability.NONE
    stay = fo.plan_failover(default, SHARED, None, [])
    assert isinstance(stay, fo.Stay)
    assert stay.stalled


def test_restart_needs_every_writable_disk_shared() -> None:
    ok = fo.plan_failover(
        spec("Restart", disk("a", "virtfleet-shared"), disk("ro", read_only=True)), SHARED, None, []
    )
    assert ok == fo.Plan(HighAvailability.RESTART)
    refused = fo.plan_failover(
        spec("Restart", disk("a"), disk("b", "virtfleet-local")), SHARED, None, []
    )
    assert isinstance(refused, fo.Stay)
    assert refused.reason == "DisksNotShared"
    assert "a (the default pool)" in refused.message
    assert "b (virtfleet-local)" in refused.message


def test_restore_from_backup_takes_the_latest_completed_backup_of_this_vm() -> None:
    def backup(name: str, uid: str, age: int, phase: str = "Completed") -> dict[str, Any]:
        done = (NOW - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "metadata": {"name": name},
            "status": {"phase": phase, "vmUID": uid, "completionTime": done},
        }

    found = fo.latest_backups(
        "u1",
        [
            backup("old", "u1", 3600),
            backup("new", "u1", 60),
            backup("running", "u1", 1, phase="Running"),
            backup("other-vm", "u2", 5),
        ],
    )
    plan = fo.plan_failover(spec("RestoreFromBackup", disk("a")), SHARED, None, found)
    assert isinstance(plan, fo.Plan)
    assert plan.backup is not None
    assert plan.backup.name == "new"
    none = fo.plan_failover(spec("RestoreFromBackup", disk("a")), SHARED, None, [])
    assert isinstance(none, fo.Stay)
    assert none.reason == "NoBackup"
    assert not none.stalled  # a backup may complete later


def test_the_status_names_both_nodes_why_and_the_rpo() -> None:
    plan = fo.Plan(
        HighAvailability.RESTORE_FROM_BACKUP, fo.BackupRef("b1", NOW - timedelta(seconds=90))
    )
    status = fo.failover_status(
        {"nodeName": "node-a", "printableStatus": "Unknown", "failover": {"count": 2}},
        3,
        plan,
        from_node="node-a",
        to_node="node-b",
        reason="watchdog deadline passed",
        now=NOW,
        timestamp="2026-12-07T12:00:00Z",
    )
    assert status["nodeName"] == "node-b"
    assert status["printableStatus"] == "Starting"
    failover = status["failover"]
    assert failover["count"] == 3
    assert failover["rpoSeconds"] == 90
    assert failover["backupName"] == "b1"
    message = fo.failover_message(status)
    assert "node-a" in message
    assert "node-b" in message
    assert "RPO" in message
    assert fo.failed_over_from({"status": status}, "node-a") == "node-b"
    assert fo.failed_over_from({"status": status}, "node-b") is None
