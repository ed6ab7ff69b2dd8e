"""Argo CD health checks of the virtfleet kinds, run by a real Lua interpreter.

The layout and fixture format are Argo CD's own (``resource_customizations/<group>/<kind>/
health.lua`` + ``health_test.yaml`` + ``testdata/``): each case is an input object and the
health status and message the script must return. Argo CD runs gopher-lua, a Lua 5.1; the
tests use Debian's ``lua5.1`` with ``lua-cjson`` (installed by ``scripts/bootstrap``), and
``run_health.lua`` gives the script only the libraries Argo CD opens for argocd-cm scripts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtfleet.api.backup import BackupPhase, LocationPhase
from virtfleet.api.migration import MigrationPhase
from virtfleet.api.resources import KINDS_BY_NAME
from virtfleet.api.snapshot import RestorePhase, SnapshotPhase
from virtfleet.api.virtualmachine import PrintableStatus

REPO = Path(__file__).resolve().parents[2]
HEALTH = REPO / "charts" / "virtfleet" / "health" / "virtfleet.io"
RUNNER = Path(__file__).with_name("run_health.lua")
KINDS = (
    "VirtualMachine",
    "VMSnapshot",
    "VMRestore",
    "VMMigration",
    "VMHost",
    "VMBackup",
    "VMBackupLocation",
    "VMBackupSchedule",
    "VMNetwork",
)
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def lua() -> str:
    found = shutil.which("lua5.1")
    if found is None:
        pytest.fail("lua5.1 is missing: run scripts/bootstrap (Debian lua5.1 + lua-cjson)")
    return found


def cases() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for kind in KINDS:
        for case in yaml.safe_load((HEALTH / kind / "health_test.yaml").read_text())["tests"]:
            found.append((kind, case))
    return found


def run_script(script: Path, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [lua(), str(RUNNER), str(script)],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )


def run_health(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    result = run_script(HEALTH / kind / "health.lua", obj)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _ready(status: str, reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "message": message, **extra}


def _schedule(status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    meta = {"name": "s", "generation": generation}
    return {"kind": "VMBackupSchedule", "metadata": meta, "status": status}


@pytest.mark.parametrize(
    ("kind", "case"), cases(), ids=lambda v: v if isinstance(v, str) else v["inputPath"]
)
def test_health_fixture(kind: str, case: dict[str, Any]) -> None:
    obj = yaml.safe_load((HEALTH / kind / case["inputPath"]).read_text())
    assert obj["kind"] == kind
    assert run_health(kind, obj) == case["healthStatus"]


def test_every_kind_has_a_script() -> None:
    assert sorted(p.name for p in HEALTH.iterdir()) == sorted(KINDS)


def _status_value(kind: str, status: dict[str, Any]) -> str | None:
    """The kind's status field; a VMBackupSchedule has no phase: its Ready reason."""
    if kind == "VMBackupSchedule":
        ready = [c for c in status.get("conditions") or [] if c["type"] == "Ready"]
        return str(ready[0]["reason"]) if ready else None
    value = status.get("printableStatus" if kind == "VirtualMachine" else "phase")
    return str(value) if value else None


def _statuses(kind: str) -> dict[str, set[str]]:
    """value of the kind's status field → health statuses its fixtures expect."""
    seen: dict[str, set[str]] = {}
    for k, case in cases():
        if k != kind:
            continue
        obj = yaml.safe_load((HEALTH / kind / case["inputPath"]).read_text())
        value = _status_value(kind, obj.get("status") or {})
        if value:
            seen.setdefault(value, set()).add(case["healthStatus"]["status"])
    return seen


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("VirtualMachine", [s.value for s in PrintableStatus]),
        ("VMSnapshot", [s.value for s in SnapshotPhase]),
        ("VMRestore", [s.value for s in RestorePhase]),
        ("VMMigration", [s.value for s in MigrationPhase]),
        ("VMBackup", [s.value for s in BackupPhase]),
        ("VMBackupLocation", [s.value for s in LocationPhase]),
        # The Ready reasons the controller writes (controller/backups.py).
        ("VMBackupSchedule", ["Scheduled", "Suspended", "InvalidSchedule"]),
    ],
)
def test_a_fixture_per_status_value(kind: str, values: list[str]) -> None:
    """Every printableStatus / phase the API can report has at least one fixture."""
    seen = _statuses(kind)
    missing = [v for v in values if v not in seen]
    assert missing == []


def _expected(kind: str, fixture: str) -> str:
    for k, case in cases():
        if k == kind and case["inputPath"] == f"testdata/{fixture}.yaml":
            return str(case["healthStatus"]["status"])
    raise KeyError(fixture)


@pytest.mark.parametrize(
    ("kind", "fixture", "health"),
    [
        ("VirtualMachine", "running", "Healthy"),
        ("VirtualMachine", "stopped-halted", "Healthy"),  # stopped on purpose
        ("VirtualMachine", "crashloop", "Degraded"),
        ("VirtualMachine", "failed", "Degraded"),
        ("VirtualMachine", "stalled-running", "Degraded"),
        ("VirtualMachine", "scheduling", "Progressing"),
        ("VirtualMachine", "starting", "Progressing"),
        ("VirtualMachine", "migrating", "Progressing"),
        ("VirtualMachine", "generation-behind", "Progressing"),
        ("VirtualMachine", "unknown", "Unknown"),
        ("VirtualMachine", "paused", "Suspended"),
        ("VMSnapshot", "ready", "Healthy"),
        ("VMSnapshot", "failed", "Degraded"),
        ("VMRestore", "succeeded", "Healthy"),
        ("VMRestore", "failed", "Degraded"),
        ("VMMigration", "succeeded", "Healthy"),
        ("VMMigration", "failed", "Degraded"),
        ("VMMigration", "cancelled", "Degraded"),
        ("VMBackup", "completed", "Healthy"),
        ("VMBackup", "failed", "Degraded"),
        ("VMBackup", "deletion-blocked", "Degraded"),
        ("VMBackup", "no-status", "Progressing"),
        ("VMBackup", "uploading", "Progressing"),
        ("VMBackup", "generation-behind", "Progressing"),
        ("VMBackupLocation", "available", "Healthy"),
        ("VMBackupLocation", "unavailable", "Degraded"),
        ("VMBackupLocation", "no-status", "Progressing"),
        ("VMBackupLocation", "generation-behind", "Progressing"),
        ("VMBackupSchedule", "scheduled", "Healthy"),
        ("VMBackupSchedule", "missed-runs", "Healthy"),
        ("VMBackupSchedule", "suspended", "Suspended"),
        ("VMBackupSchedule", "invalid", "Degraded"),
        ("VMBackupSchedule", "invalid-after-edit", "Degraded"),
        ("VMBackupSchedule", "no-status", "Progressing"),
        ("VMBackupSchedule", "generation-behind", "Progressing"),
    ],
)
def test_the_contract(kind: str, fixture: str, health: str) -> None:
    """The mapping documented in docs/gitops.md, in one place."""
    assert _expected(kind, fixture) == health


@pytest.mark.parametrize("phase", ["Scheduled", "PreparingTarget", "Running", "Pending"])
def test_migration_phases_in_flight_are_progressing(phase: str) -> None:
    obj = {"kind": "VMMigration", "metadata": {"name": "m"}, "status": {"phase": phase}}
    assert run_health("VMMigration", obj)["status"] == "Progressing"


@pytest.mark.parametrize("phase", ["Pending", "InProgress", "Uploading"])
def test_backup_phases_in_flight_are_progressing(phase: str) -> None:
    obj = {"kind": "VMBackup", "metadata": {"name": "b"}, "status": {"phase": phase}}
    assert run_health("VMBackup", obj) == {"status": "Progressing", "message": f"Backup {phase}"}


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1.0 MiB"),
        (10 * 2**20, "10.0 MiB"),
        (3 * 2**40, "3.0 TiB"),
    ],
)
def test_backup_size_in_binary_units(size: int, shown: str) -> None:
    status = {"phase": "Completed", "type": "Incremental", "sizeBytes": size}
    obj = {"kind": "VMBackup", "metadata": {"name": "b"}, "status": status}
    assert run_health("VMBackup", obj)["message"] == f"Incremental backup completed ({shown})"


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("VMBackup", {"phase": "Completed", "type": "Full"}),
        ("VMBackupLocation", {"phase": "Available"}),
        ("VMBackupSchedule", {"conditions": [_ready("True", "Scheduled", "next run x")]}),
    ],
)
def test_no_observed_generation_is_not_behind(kind: str, status: dict[str, Any]) -> None:
    """As in kstatus, only a written ``observedGeneration`` can be behind (the agent writes
    none on a VMBackup, whose spec is immutable)."""
    obj = {"kind": kind, "metadata": {"name": "x", "generation": 3}, "status": status}
    assert run_health(kind, obj)["status"] == "Healthy"


@pytest.mark.parametrize(
    ("kind", "phase"), [("VMBackup", "Failed"), ("VMBackupLocation", "Unavailable")]
)
def test_degraded_without_a_message(kind: str, phase: str) -> None:
    obj = {"kind": kind, "metadata": {"name": "x"}, "status": {"phase": phase}}
    result = run_health(kind, obj)
    assert result["status"] == "Degraded"
    assert result["message"].startswith(phase)


@pytest.mark.parametrize(
    ("missed", "suffix"),
    [(None, ""), (0, ""), (1, "; 1 run missed"), (2, "; 2 runs missed"), (10, "; 10 runs missed")],
)
@pytest.mark.parametrize(
    ("reason", "message", "health"),
    [("Scheduled", "next run x", "Healthy"), ("Suspended", "suspended: no runs", "Suspended")],
)
def test_schedule_missed_runs_in_the_message(
    missed: int | None, suffix: str, reason: str, message: str, health: str
) -> None:
    status: dict[str, Any] = {
        "observedGeneration": 1,
        "conditions": [_ready("True", reason, message)],
    }
    if missed is not None:
        status["missedRuns"] = missed
    assert run_health("VMBackupSchedule", _schedule(status)) == {
        "status": health,
        "message": message + suffix,
    }


def test_schedule_conditions_without_a_message_show_their_reason() -> None:
    stalled = {"type": "Stalled", "status": "True", "reason": "InvalidSchedule", "message": ""}
    status: dict[str, Any] = {"conditions": [_ready("False", "InvalidSchedule"), stalled]}
    assert run_health("VMBackupSchedule", _schedule(status)) == {
        "status": "Degraded",
        "message": "Stalled: InvalidSchedule",
    }
    status = {"observedGeneration": 1, "conditions": [_ready("True", "Scheduled")]}
    assert run_health("VMBackupSchedule", _schedule(status))["message"] == "Scheduled"


def test_schedule_not_ready_and_not_stalled_is_progressing() -> None:
    status = {"observedGeneration": 1, "conditions": [_ready("Unknown", "Starting", "starting")]}
    assert run_health("VMBackupSchedule", _schedule(status)) == {
        "status": "Progressing",
        "message": "starting",
    }


@pytest.mark.parametrize(
    ("observed", "ready_observed", "health"),
    [
        (None, 1, "Progressing"),  # only the Ready condition was stamped, at generation 1
        (1, 1, "Progressing"),
        (1, 2, "Degraded"),  # generation 2 was judged unusable: stamped on the conditions only
        (2, 2, "Degraded"),
    ],
)
def test_schedule_generation_observed_on_status_or_ready(
    observed: int | None, ready_observed: int, health: str
) -> None:
    """The controller writes no status.observedGeneration with InvalidSchedule; its Ready
    condition carries the generation it judged."""
    stalled = {"type": "Stalled", "status": "True", "reason": "InvalidSchedule", "message": "no"}
    ready = _ready("False", "InvalidSchedule", "no", observedGeneration=ready_observed)
    status: dict[str, Any] = {"conditions": [ready, stalled]}
    if observed is not None:
        status["observedGeneration"] = observed
    assert run_health("VMBackupSchedule", _schedule(status, generation=2))["status"] == health


@pytest.mark.parametrize(
    ("kind", "case"), cases(), ids=lambda v: v if isinstance(v, str) else v["inputPath"]
)
def test_fixture_status_uses_the_api_fields(kind: str, case: dict[str, Any]) -> None:
    """Each fixture's status reads back unchanged through the kind's status model: the
    scripts are tested against field names (and values) the API has, not typos of them."""
    obj = yaml.safe_load((HEALTH / kind / case["inputPath"]).read_text())
    status = obj.get("status") or {}
    model = KINDS_BY_NAME[kind].status_model.model_validate(status)
    wire = model.model_dump(mode="json", by_alias=True, exclude_none=True)  # as to_wire()
    assert {key: wire.get(key) for key in status} == status


@pytest.mark.parametrize(
    "expression",
    ['string.format("%d", 1)', "math.floor(1.5)", '("x"):upper()', 'io.write("x")'],
)
def test_no_libraries_as_in_argo_cd(tmp_path: Path, expression: str) -> None:
    """Argo CD opens no string, math or io library for argocd-cm scripts (without
    ``resource.customizations.useOpenLibs``): a script using one fails there, so here too."""
    script = tmp_path / "health.lua"
    script.write_text(f'local _ = {expression}\nreturn {{ status = "Healthy" }}\n')
    result = run_script(script, {"kind": "X", "metadata": {"name": "x"}})
    assert result.returncode != 0
    assert "attempt to" in result.stderr


def test_json_null_is_nil_as_in_argo_cd() -> None:
    obj = {"kind": "VirtualMachine", "metadata": {"generation": 1}, "status": None}
    assert run_health("VirtualMachine", obj)["status"] == "Progressing"


def test_only_argo_cd_statuses() -> None:
    assert {case["healthStatus"]["status"] for _, case in cases()} <= ARGO_STATUSES
