"""The finalizer swap of a migration hand-over (found by the chaos e2e run)."""

from __future__ import annotations

from virtfleet.agent.migration.handoff import handoff_finalizers

SOURCE = "virtfleet.io/agent-node-a"
TARGET = "virtfleet.io/agent-node-b"
OTHER = "example.com/keep-me"


def test_the_target_takes_over_from_the_source() -> None:
    assert handoff_finalizers([SOURCE, OTHER], SOURCE, TARGET, deleting=False) == [OTHER, TARGET]


def test_a_repeated_handoff_adds_nothing_twice() -> None:
    assert handoff_finalizers([OTHER, TARGET], SOURCE, TARGET, deleting=False) == [OTHER, TARGET]


def test_a_vm_deleted_mid_migration_gets_no_new_finalizer() -> None:
    # The apiserver refuses new finalizers on an object being deleted: adding the
    # target's would fail the hand-over forever and the deletion would never end.
    assert handoff_finalizers([SOURCE, OTHER], SOURCE, TARGET, deleting=True) == [OTHER]
