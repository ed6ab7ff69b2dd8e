"""``VMMigration``: move one VM to another node, live or offline."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from virtfleet.api.base import ApiModel, CelRule, DnsLabel, DnsSubdomain, StatusModel
from virtfleet.api.conditions import Conditions
from virtfleet.api.snapshot import immutable_spec_rule


class MigrationMode(StrEnum):
    LIVE = "Live"
    OFFLINE = "Offline"


class MigrationPhase(StrEnum):
    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    SCHEDULED = "Scheduled"
    PREPARING_TARGET = "PreparingTarget"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class MigrationPolicy(ApiModel):
    bandwidth_mibps: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        alias="bandwidthMiBps",
        description="Cap on migration bandwidth in MiB/s.",
    )
    max_downtime_ms: int | None = Field(
        default=None, ge=1, le=60_000, description="Longest pause allowed at switch-over, in ms."
    )
    completion_timeout_per_gib: int | None = Field(
        default=None,
        ge=1,
        le=86_400,
        alias="completionTimeoutPerGiB",
        description="Abort when not done after this many seconds per GiB of RAM and disk copied.",
    )
    auto_converge: bool = Field(
        default=False, description="Throttle guest vCPUs when memory is dirtied faster than sent."
    )
    post_copy: bool = Field(
        default=False,
        description="Switch to post-copy when pre-copy stalls. A failure after the switch "
        "loses the guest: its memory is split between the two nodes.",
    )


class VMMigrationSpec(ApiModel):
    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    target_node: DnsSubdomain | None = Field(
        default=None, description="Node to move to; unset lets the controller choose."
    )
    mode: MigrationMode = Field(
        default=MigrationMode.LIVE, description="Live (default) or Offline."
    )
    policy: MigrationPolicy = Field(default_factory=MigrationPolicy)

    cel_rules = (
        immutable_spec_rule(),
        CelRule(
            rule="!has(self.policy) || !has(self.policy.postCopy) || !self.policy.postCopy "
            "|| !has(self.mode) || self.mode == 'Live'",
            message="policy.postCopy only applies to mode Live",
            check=lambda s: not s.policy.post_copy or s.mode == MigrationMode.LIVE,
        ),
        CelRule(
            rule="!has(self.policy) || !has(self.policy.autoConverge) || !self.policy.autoConverge "
            "|| !has(self.mode) || self.mode == 'Live'",
            message="policy.autoConverge only applies to mode Live",
            check=lambda s: not s.policy.auto_converge or s.mode == MigrationMode.LIVE,
        ),
    )


class MigrationProgress(StatusModel):
    percent: int | None = Field(default=None, ge=0, le=100)
    data_total_bytes: int | None = Field(default=None, ge=0)
    data_processed_bytes: int | None = Field(default=None, ge=0)
    data_remaining_bytes: int | None = Field(default=None, ge=0)
    dirty_rate_bytes_per_second: int | None = Field(default=None, ge=0)
    iteration: int | None = Field(default=None, ge=0)


class VMMigrationStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: MigrationPhase | None = None
    source_node: str | None = None
    target_node: str | None = None
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    progress: MigrationProgress | None = None
    downtime_ms: int | None = Field(default=None, ge=0)
    failure_reason: str | None = None
    conditions: Conditions
