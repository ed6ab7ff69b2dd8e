"""The status an unexpected reconcile error leaves: Stalled/Ready=False, nothing else moved."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

from virtfleet.reconcile.internal import (
    INTERNAL_ERROR,
    MAX_MESSAGE,
    describe,
    internal_error_message,
    internal_error_status,
)

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def by_type(status: dict[str, object]) -> dict[str, dict[str, object]]:
    listed = cast(list[dict[str, object]], status["conditions"])
    return {str(c["type"]): c for c in listed}


def test_stalled_and_not_ready_with_the_error_and_nothing_else_changed() -> None:
    stored = {
        "phase": "Running",
        "printableStatus": "Running",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Running", "lastTransitionTime": "x"},
            {"type": "Reconciling", "status": "True", "reason": "Starting",
             "lastTransitionTime": "x"},
            {"type": "RestartRequired", "status": "True", "reason": "Changed",
             "lastTransitionTime": "x"},
            {"type": "Broken"},  # does not parse: dropped, rewritten below
        ],
    }  # fmt: skip
    message = internal_error_message(OverflowError("date value out of range"))
    status = internal_error_status(stored, 3, message, NOW)
    conditions = by_type(status)
    assert set(conditions) == {"Ready", "Stalled", "RestartRequired"}
    for kind, value in (("Ready", "False"), ("Stalled", "True")):
        assert conditions[kind]["status"] == value
        assert conditions[kind]["reason"] == INTERNAL_ERROR
        assert "OverflowError: date value out of range" in str(conditions[kind]["message"])
        assert conditions[kind]["observedGeneration"] == 3
    assert (status["phase"], status["printableStatus"]) == ("Running", "Running")
    assert stored["conditions"][0]["status"] == "True"  # type: ignore[index]  # not mutated


def test_the_same_error_again_changes_nothing() -> None:
    """So a retry with backoff writes no status (and the Event only counts up)."""
    message = internal_error_message(KeyError("x"))
    first = internal_error_status({}, 1, message, NOW)
    again = internal_error_status(first, 1, message, NOW + timedelta(minutes=5))
    assert again == first


def test_messages_are_one_printable_bounded_line() -> None:
    text = describe(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert text.startswith("UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff")
    hostile = describe(ValueError("line\nbreak\x00" + "x" * 5000))
    assert hostile.isprintable()
    assert "\\n" in hostile
    assert len(hostile) <= MAX_MESSAGE
    assert describe(RuntimeError()) == "RuntimeError"
