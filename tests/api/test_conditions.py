from __future__ import annotations

from virtfleet.api.conditions import (
    ConditionStatus,
    find_condition,
    remove_condition,
    set_condition,
)

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:01:00Z"


def test_new_condition_gets_a_transition_time() -> None:
    conds = set_condition([], type="Ready", status=ConditionStatus.TRUE, reason="Running", now=T0)
    assert conds[0].last_transition_time == T0
    assert conds[0].status == ConditionStatus.TRUE


def test_same_status_keeps_transition_time_even_if_reason_changes() -> None:
    conds = set_condition([], type="Ready", status=ConditionStatus.TRUE, reason="A", now=T0)
    conds = set_condition(conds, type="Ready", status=ConditionStatus.TRUE, reason="B", now=T1)
    assert conds[0].last_transition_time == T0
    assert conds[0].reason == "B"


def test_status_change_moves_transition_time() -> None:
    conds = set_condition([], type="Ready", status=ConditionStatus.TRUE, reason="A", now=T0)
    conds = set_condition(conds, type="Ready", status=ConditionStatus.FALSE, reason="B", now=T1)
    assert conds[0].last_transition_time == T1


def test_other_conditions_are_kept_in_order() -> None:
    conds = set_condition([], type="Ready", status=ConditionStatus.TRUE, reason="A", now=T0)
    conds = set_condition(conds, type="Paused", status=ConditionStatus.TRUE, reason="P", now=T0)
    conds = set_condition(conds, type="Ready", status=ConditionStatus.FALSE, reason="C", now=T1)
    assert [c.type for c in conds] == ["Ready", "Paused"]
    assert find_condition(conds, "Paused") is not None
    assert [c.type for c in remove_condition(conds, "Paused")] == ["Ready"]


def test_wire_shape_is_metav1_condition() -> None:
    conds = set_condition(
        [],
        type="Ready",
        status=ConditionStatus.TRUE,
        reason="Running",
        observed_generation=3,
        now=T0,
    )
    assert conds[0].to_wire() == {
        "type": "Ready",
        "status": "True",
        "reason": "Running",
        "message": "",
        "lastTransitionTime": T0,
        "observedGeneration": 3,
    }
