"""The Kubernetes condition shape and the kstatus condition types every kind reports.

``Ready``, ``Reconciling`` and ``Stalled`` follow kstatus (sigs.k8s.io/cli-utils), which
Flux, Argo CD and ``kubectl wait`` read: ``Reconciling``/``Stalled`` are abnormal-true
conditions present only while true is meaningful; ``Ready`` is always present.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints, ValidationError

from virtfleet.api.base import StatusModel


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    PAUSED = "Paused"
    RESTART_REQUIRED = "RestartRequired"
    LIVE_MIGRATABLE = "LiveMigratable"
    AGENT_CONNECTED = "AgentConnected"


Reason = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", min_length=1, max_length=1024
    ),
]


class Condition(StatusModel):
    """``metav1.Condition``: the same fields, names and meaning."""

    type: Annotated[str, StringConstraints(max_length=316)] = Field(
        description="Type of condition in CamelCase, e.g. Ready."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Reason = Field(description="Machine-readable CamelCase reason for the last change.")
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        default="", description="Human-readable detail."
    )
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this condition was computed for."
    )


#: Kubernetes timestamps: UTC, whole seconds, ``Z``.
_RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(moment: datetime) -> str:
    """``moment`` as Kubernetes writes timestamps."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime(_RFC3339)


def parse_rfc3339(text: str) -> datetime:
    """A Kubernetes timestamp as an aware UTC datetime."""
    return datetime.strptime(text, _RFC3339).replace(tzinfo=UTC)


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def set_condition(
    conditions: list[Condition] | tuple[Condition, ...],
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """Return conditions with one set; ``lastTransitionTime`` moves only when status does.

    Keeping the old timestamp when only reason/message change is what makes
    "write status only when it changes" (DESIGN §3.4) possible.
    """
    result: list[Condition] = []
    replaced = False
    for existing in conditions:
        if existing.type != type:
            result.append(existing)
            continue
        replaced = True
        moved = existing.status != status
        result.append(
            Condition(
                type=type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=(now or now_rfc3339())
                if moved
                else existing.last_transition_time,
                observed_generation=observed_generation,
            )
        )
    if not replaced:
        result.append(
            Condition(
                type=type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now or now_rfc3339(),
                observed_generation=observed_generation,
            )
        )
    return result


def remove_condition(
    conditions: list[Condition] | tuple[Condition, ...], type: str
) -> list[Condition]:
    return [c for c in conditions if c.type != type]


def find_condition(
    conditions: list[Condition] | tuple[Condition, ...], type: str
) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)


#: A list keyed by ``type``, so server-side apply and strategic merges treat it as a map.
Conditions = Annotated[
    list[Condition],
    Field(
        default_factory=list,
        max_length=16,
        description="Current state in the Kubernetes condition shape (kstatus).",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    ),
]


def kstatus_conditions(
    conditions: list[Condition] | tuple[Condition, ...],
    generation: int | None,
    *,
    ready: tuple[ConditionStatus, str, str],
    reconciling: tuple[str, str] | None,
    stalled: tuple[str, str] | None,
    now: str | None = None,
) -> list[Condition]:
    """The three kstatus conditions at once: ``Ready`` always, the abnormal-true pair only
    while it holds (``reconciling``/``stalled`` are ``(reason, message)`` or None).

    The one place that knows kstatus's rule; every kind's status goes through it.
    """
    out = set_condition(
        conditions,
        type=ConditionType.READY,
        status=ready[0],
        reason=ready[1],
        message=ready[2],
        observed_generation=generation,
        now=now,
    )
    for kind, value in ((ConditionType.RECONCILING, reconciling), (ConditionType.STALLED, stalled)):
        if value is None:
            out = remove_condition(out, kind)
        else:
            out = set_condition(
                out,
                type=kind,
                status=ConditionStatus.TRUE,
                reason=value[0],
                message=value[1],
                observed_generation=generation,
                now=now,
            )
    return out


def read_conditions(status: Mapping[str, Any]) -> list[Condition]:
    """The stored conditions; entries that do not parse are dropped (and thus rewritten)."""
    out: list[Condition] = []
    for raw in status.get("conditions") or ():
        try:
            out.append(Condition.model_validate(raw))
        except ValidationError:
            continue
    return out


def write_conditions(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions]
