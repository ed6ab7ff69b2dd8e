"""How the chaos test judges a request whose VM the workload deleted meanwhile."""

from __future__ import annotations

from typing import Any

import pytest

from harness.chaos import Request
from harness.chaos_outcomes import outcome_of


def failed(reason: str) -> dict[str, Any]:
    condition = {"type": "Ready", "status": "False", "reason": reason}
    return {"status": {"phase": "Failed", "conditions": [condition]}}


@pytest.mark.parametrize(
    ("kind", "deleted_after", "expected"),
    [
        ("vmsnapshot", 10.0, "refused"),
        ("vmsnapshot", 40.0, "failed"),  # < 1 s of work had 40 s
        ("vmmigration", 40.0, "refused"),  # seed 1282817680: apiserver away up to 60 s
        ("vmmigration", 90.0, "failed"),
    ],
)
def test_a_request_whose_vm_went_is_refused_only_when_it_went_soon(
    kind: str, deleted_after: float, expected: str
) -> None:
    request = Request(kind, "r", "vm", quiet=False, at=100.0)
    outcome = outcome_of(request, failed("VMNotFound"), False, 100.0 + deleted_after)
    assert outcome.outcome == expected
