"""``VMHost``: one per node, written by that node's agent; what the controller places by."""

from __future__ import annotations

from pydantic import Field

from virtfleet.api.base import ApiModel, StatusModel
from virtfleet.api.conditions import Conditions


class VMHostSpec(ApiModel):
    """Empty on purpose: a VMHost is pure observation (its name is the node's)."""


class PoolStatus(StatusModel):
    name: str
    capacity_bytes: int | None = Field(default=None, ge=0)
    available_bytes: int | None = Field(default=None, ge=0)


class VMHostStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    cpus: int | None = Field(default=None, ge=0, description="Logical CPUs of the host.")
    memory_bytes: int | None = Field(default=None, ge=0, description="Host RAM.")
    free_memory_bytes: int | None = Field(default=None, ge=0)
    allocated_memory_bytes: int | None = Field(
        default=None, ge=0, description="RAM promised to VMs placed on this node."
    )
    vm_count: int | None = Field(default=None, ge=0, alias="vmCount")
    hypervisor: str | None = Field(default=None, description="Domain type used: kvm or qemu (TCG).")
    libvirt_version: str | None = None
    qemu_version: str | None = None
    host_uuid: str | None = Field(default=None, alias="hostUUID")
    migration_uri: str | None = Field(default=None, alias="migrationURI")
    heartbeat_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    pools: list[PoolStatus] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="Names in the node's image store.")
    conditions: Conditions
