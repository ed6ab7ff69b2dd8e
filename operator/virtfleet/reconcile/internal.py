"""What an object says when its reconcile failed in a way nobody anticipated.

Every loop maps the errors it knows to reasons (``DownloadFailed``, ``InvalidSpec``,
...). Anything else is a bug or an input no rule foresaw; the work queue retries it with
backoff, and the object must not stay silent meanwhile: ``Stalled=True`` and
``Ready=False`` with reason ``InternalError`` and the error's class and message, the
same for every kind. Pure: the loops write the result and record the Event.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from virtfleet.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    remove_condition,
    rfc3339,
    set_condition,
)

INTERNAL_ERROR = "InternalError"
#: Longest message kept (an Event keeps 1024 characters; a condition would take more).
MAX_MESSAGE = 900


def describe(exc: BaseException) -> str:
    """``Class: message`` on one line, bounded, without control characters.

    The message of an unexpected error may carry user input (a URL, a Secret's bytes
    decoded as far as they went); it is shown, so it is made printable and short.
    """
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(printable) > MAX_MESSAGE:
        printable = printable[: MAX_MESSAGE - 3] + "..."
    return printable


def internal_error_message(exc: BaseException) -> str:
    """What the condition and the Event say (the agent's log has the traceback)."""
    return f"unexpected error, retried with backoff: {describe(exc)}"


def internal_error_status(
    status: Mapping[str, Any] | None, generation: int, message: str, now: datetime
) -> dict[str, Any]:
    """The stored (wire) status with Ready=False and Stalled=True (``InternalError``).

    Every other field stays as it was: the error says nothing about phase, power or
    placement. ``Reconciling`` goes (kstatus: Stalled and Reconciling exclude each
    other). The next successful pass of the loop rewrites the conditions.
    """
    out = copy.deepcopy(dict(status or {}))
    conditions = _read(out.get("conditions"))
    when = rfc3339(now)
    for kind, value in (
        (ConditionType.READY, ConditionStatus.FALSE),
        (ConditionType.STALLED, ConditionStatus.TRUE),
    ):
        conditions = set_condition(
            conditions,
            type=kind,
            status=value,
            reason=INTERNAL_ERROR,
            message=message,
            observed_generation=generation,
            now=when,
        )
    conditions = remove_condition(conditions, ConditionType.RECONCILING)
    out["conditions"] = [
        c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions
    ]
    return out


def _read(raw: Any) -> list[Condition]:
    """Stored conditions; an entry that does not parse is dropped (and so rewritten)."""
    out: list[Condition] = []
    for item in raw if isinstance(raw, list) else ():
        try:
            out.append(Condition.model_validate(item))
        except ValidationError:
            continue
    return out
