"""The chaos test's stand-in operator escalates like the HypervisorJobStuck message says.

First remedy: restart the node's libvirtd once a VM has said it for ``patience``
seconds. A VM still saying it ``patience`` seconds after that restart (libvirtd kept the
ownerless job because QEMU survived) gets its domain's QEMU killed; one that has no QEMU,
or still says it after the kill, gets its status file removed with libvirtd stopped.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from harness import chaos_invariants
from harness import nodes as hn

NS = "chaos"


def vm(reason: str, node: str = "node-a", *, ready: bool = False) -> dict[str, Any]:
    condition = {"type": "Ready", "status": str(ready), "reason": reason}
    return {"status": {"nodeName": node, "conditions": [condition]}}


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state: dict[str, Any] = {"vms": {}, "acts": []}

    def objects(cluster: Any, namespace: str) -> dict[str, dict[str, Any]]:
        return {"vm": state["vms"]}

    monkeypatch.setattr(chaos_invariants, "objects", objects)
    monkeypatch.setattr(
        hn, "restart_libvirtd", lambda node, **_: state["acts"].append(("restart", node.name))
    )
    state["qemu"] = True

    def kill_qemu(node: Any, dom: str) -> bool:
        if state["qemu"]:
            state["acts"].append(("kill", node.name, dom))
        return bool(state["qemu"])

    monkeypatch.setattr(hn, "kill_qemu", kill_qemu)
    monkeypatch.setattr(
        hn, "forget_dead_domain", lambda node, dom: state["acts"].append(("forget", node.name, dom))
    )
    return state


def operator() -> chaos_invariants.StuckJobOperator:
    cluster: Any = SimpleNamespace(nodes=[SimpleNamespace(name="node-a")])
    return chaos_invariants.StuckJobOperator(cluster, NS, patience=45)


def test_a_restart_first_then_the_domains_qemu(world: dict[str, Any]) -> None:
    op = operator()
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK), "db": vm("Running")}
    op.step(0)
    op.step(44)
    assert world["acts"] == []  # patience
    op.step(45)
    assert world["acts"] == [("restart", "node-a")]
    op.step(89)
    assert world["acts"] == [("restart", "node-a")]
    op.step(90)  # still stuck 45 s after the restart: QEMU survived it
    assert world["acts"][-1] == ("kill", "node-a", f"{NS}_web")
    assert dict(op.restarts) == {"node-a": 1}
    assert dict(op.qemu_kills) == {"node-a": 1}


def test_a_vm_that_recovered_after_the_restart_is_left_alone(world: dict[str, Any]) -> None:
    op = operator()
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK)}
    op.step(0)
    op.step(45)
    world["vms"] = {"web": vm("Running", ready=True)}
    op.step(100)
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK)}  # stuck again, later: anew
    op.step(101)
    op.step(146)
    assert world["acts"] == [("restart", "node-a"), ("restart", "node-a")]
    assert dict(op.qemu_kills) == {}


def test_a_moment_of_another_reason_after_the_restart_still_escalates(
    world: dict[str, Any],
) -> None:
    """While libvirtd restarts, the agent reconnects and the VM reads otherwise briefly."""
    op = operator()
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK)}
    op.step(0)
    op.step(45)
    world["vms"] = {"web": vm("HypervisorUnavailable")}
    op.step(50)
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK)}
    op.step(60)
    op.step(90)
    assert world["acts"] == [("restart", "node-a"), ("kill", "node-a", f"{NS}_web")]


def test_a_vm_that_says_it_once_a_reconcile_cycle_still_escalates(
    world: dict[str, Any],
) -> None:
    """Seed 1281408029: a deleting VM said it once every ~60 s (stop 30 s + lock 30 s)."""
    op = operator()
    for t in range(0, 200, 5):
        stuck = t % 60 < 5  # said at 0, 60, 120, 180; "Terminating" in between
        world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK if stuck else "Terminating")}
        op.step(t)
    assert world["acts"][:2] == [("restart", "node-a"), ("kill", "node-a", f"{NS}_web")]


def test_no_qemu_to_kill_means_the_status_file_goes(world: dict[str, Any]) -> None:
    """Seed 1284366246: libvirtd died while it forked QEMU; restarts kept the job."""
    op = operator()
    world["qemu"] = False
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK)}
    for t in (0, 45, 90):
        op.step(t)
    assert world["acts"] == [("restart", "node-a"), ("forget", "node-a", f"{NS}_web")]
    assert dict(op.status_files_removed) == {"node-a": 1}


def test_still_stuck_after_the_kill_means_the_status_file_goes(world: dict[str, Any]) -> None:
    op = operator()
    world["vms"] = {"web": vm(chaos_invariants.JOB_STUCK)}
    for t in (0, 45, 90, 135, 180):
        op.step(t)
    assert world["acts"] == [
        ("restart", "node-a"),
        ("kill", "node-a", f"{NS}_web"),
        ("forget", "node-a", f"{NS}_web"),
        ("restart", "node-a"),  # and round again, should it come back
    ]
