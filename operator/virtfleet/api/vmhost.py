"""``VMHost``: one per node, written by that node's agent; what the controller places by."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from virtfleet.api.base import ApiModel, StatusModel
from virtfleet.api.conditions import Conditions
from virtfleet.api.network import MAX_VNI


class VMHostSpec(ApiModel):
    """Empty on purpose: a VMHost is pure observation (its name is the node's)."""


class PoolStatus(StatusModel):
    name: str
    shared: bool | None = Field(
        default=None, description="The same storage on every node (the agent's --shared-pool)."
    )
    capacity_bytes: int | None = Field(default=None, ge=0)
    available_bytes: int | None = Field(default=None, ge=0)


class NodeHealthState(StrEnum):
    HEALTHY = "Healthy"
    FAILED = "Failed"  # lease not renewed in time; its VMs are Unknown
    FENCED = "Fenced"  # proven unable to write its VMs' disks; their failover may begin
    RECOVERING = "Recovering"  # back after a fence; no placements until the hold ends


class FencingStatus(StatusModel):
    """How this node's agent fences itself (written by the agent; docs/failover.md)."""

    lease: str | None = Field(default=None, description="namespace/name of its heartbeat Lease.")
    self_fence_after_seconds: float | None = Field(
        default=None,
        ge=0,
        description="The agent stops its HA VMs when it could not renew its Lease this long.",
    )
    watchdog: str | None = Field(default=None, description="The watchdog device the agent pets.")
    watchdog_timeout_seconds: float | None = Field(
        default=None, ge=0, description="The node resets this long after the last pet."
    )


class NodeHealth(StatusModel):
    """The controller's view of the node (written by the controller)."""

    state: NodeHealthState = NodeHealthState.HEALTHY
    reason: str | None = None
    message: str | None = None
    since: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    failures: int = Field(default=0, ge=0, description="Failures in the damping window.")
    placeable_after: str | None = Field(
        default=None,
        description="Recovering: VMs are placed here again from this time on (damping).",
        json_schema_extra={"format": "date-time"},
    )


class QuarantinedVolume(StatusModel):
    """A node-local disk of a VM restored elsewhere from a backup: kept, it may hold newer
    data than that backup. Deleted only by annotating the VMHost (docs/failover.md)."""

    pool: str
    volume: str
    uid: str = Field(description="The VirtualMachine's uid.")
    vm: str | None = Field(default=None, description="namespace/name of that VM, if it exists.")
    capacity_bytes: int | None = Field(default=None, ge=0)


class RealisedNetwork(StatusModel):
    name: str
    vni: int = Field(ge=1, le=MAX_VNI)


class VMHostStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    cpus: int | None = Field(default=None, ge=0, description="Logical CPUs of the host.")
    memory_bytes: int | None = Field(default=None, ge=0, description="Host RAM.")
    free_memory_bytes: int | None = Field(default=None, ge=0)
    allocated_memory_bytes: int | None = Field(
        default=None, ge=0, description="RAM promised to VMs placed on this node."
    )
    memory: str | None = Field(default=None, description="Host RAM, for people (19.3Gi).")
    free_memory: str | None = Field(default=None, description="Free host RAM, for people.")
    allocated_memory: str | None = Field(
        default=None, description="RAM promised to VMs placed here, for people."
    )
    vm_count: int | None = Field(default=None, ge=0, alias="vmCount")
    hypervisor: str | None = Field(default=None, description="Domain type used: kvm or qemu (TCG).")
    libvirt_version: str | None = None
    qemu_version: str | None = None
    host_uuid: str | None = Field(default=None, alias="hostUUID")
    migration_uri: str | None = Field(default=None, alias="migrationURI")
    tunnel_address: str | None = Field(
        default=None,
        description="The node's underlay address other nodes send VXLAN traffic of "
        "VMNetworks to. Written by the agent.",
    )
    networks: list[RealisedNetwork] = Field(
        default_factory=list,
        description="VMNetworks this node has realised (bridge and VXLAN up): those of its "
        "VMs and of VMs migrating to it. A migration's source waits for them here.",
    )
    heartbeat_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    pools: list[PoolStatus] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="Names in the node's image store.")
    fencing: FencingStatus | None = None
    health: NodeHealth | None = None
    quarantined_volumes: list[QuarantinedVolume] = Field(default_factory=list)
    conditions: Conditions
