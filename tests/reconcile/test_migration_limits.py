"""Pure decisions added for drains, parallelism limits and the completion timeout."""

from __future__ import annotations

from tests.controller.fleet_builders import NOW

from virtfleet.api.migration import MigrationPhase, VMMigrationStatus
from virtfleet.reconcile.migration import (
    EvictionCandidate,
    Refused,
    eviction_name,
    plan_eviction,
    slot_wait,
    waiting_status,
)
from virtfleet.reconcile.migration_job import GIB, completion_budget, timed_out


def test_eviction_names_are_deterministic_and_short_enough() -> None:
    assert eviction_name("web", "node-a") == "web-evict-node-a"
    assert eviction_name("web", "node-a") == eviction_name("web", "node-a")
    long_node = "n" * 250
    name = eviction_name("web", long_node)
    assert len(name) <= 253
    assert name == eviction_name("web", long_node)
    assert name != eviction_name("web2", long_node)


def test_plan_eviction_migrates_running_live_migrate_vms_and_reports_the_rest() -> None:
    plan = plan_eviction(
        [
            EvictionCandidate("b", "LiveMigrate", "Running"),
            EvictionCandidate("a", "LiveMigrate", "Running"),
            EvictionCandidate("stopped", "LiveMigrate", "Stopped"),
            EvictionCandidate("stays", "None", "Running"),
            EvictionCandidate("gone", "None", "Running", deleting=True),
        ]
    )
    assert plan.migrate == ("a", "b")
    assert plan.report == ("stays",)


def test_slots_per_node_and_per_cluster() -> None:
    assert slot_wait("a", {}, per_node=2, per_cluster=5) is None
    assert slot_wait("a", {"x": "a"}, per_node=2, per_cluster=5) is None
    wait = slot_wait("a", {"x": "a", "y": "a"}, per_node=2, per_cluster=5)
    assert isinstance(wait, Refused)
    assert wait.reason == "NodeLimitReached"
    assert "limit 2" in wait.message
    # Other nodes' migrations do not count against this node.
    assert slot_wait("a", {"x": "b", "y": "b", "z": "c"}, per_node=2, per_cluster=5) is None
    full = {str(i): f"n{i}" for i in range(5)}
    wait = slot_wait("a", full, per_node=2, per_cluster=5)
    assert isinstance(wait, Refused)
    assert wait.reason == "ClusterLimitReached"


def test_waiting_status_is_pending_and_not_stalled() -> None:
    st = waiting_status(
        VMMigrationStatus(), 1, Refused("NodeLimitReached", "2 migrations run"), NOW
    )
    assert st.phase is MigrationPhase.PENDING
    wire = st.to_wire()
    kinds = {c["type"]: c for c in wire["conditions"]}
    assert kinds["Ready"]["reason"] == "NodeLimitReached"
    assert kinds["Reconciling"]["status"] == "True"
    assert "Stalled" not in kinds or kinds["Stalled"]["status"] == "False"


def test_completion_budget_counts_ram_and_copied_disks() -> None:
    assert completion_budget(None, GIB, 0) is None
    assert completion_budget(10, GIB, GIB) == 20.0
    small = completion_budget(1, 128 * 2**20, 16 * 2**20)
    assert small is not None
    assert abs(small - 0.140625) < 1e-9
    assert not timed_out(None, 1e9)
    assert not timed_out(20.0, 19.9)
    assert timed_out(20.0, 20.1)
