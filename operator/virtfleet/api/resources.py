"""The kinds virtfleet serves: names, scope, printer columns and models, in one table.

Everything that describes a kind to Kubernetes (the CRD) or to a user (``kubectl get``)
is derived from this table, so adding a kind or a column is one edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from virtfleet.api.backup import (
    VMBackupLocationSpec,
    VMBackupLocationStatus,
    VMBackupSpec,
    VMBackupStatus,
)
from virtfleet.api.base import DNS_LABEL_PATTERN, ApiModel, CelRule
from virtfleet.api.migration import VMMigrationSpec, VMMigrationStatus
from virtfleet.api.network import VMNetworkSpec, VMNetworkStatus
from virtfleet.api.schedule import VMBackupScheduleSpec, VMBackupScheduleStatus
from virtfleet.api.snapshot import VMRestoreSpec, VMRestoreStatus, VMSnapshotSpec, VMSnapshotStatus
from virtfleet.api.virtualmachine import VirtualMachineSpec, VirtualMachineStatus
from virtfleet.api.vmhost import VMHostSpec, VMHostStatus
from virtfleet.identity import API_GROUP, API_VERSION

API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

SpecT = TypeVar("SpecT", bound=ApiModel)
StatusT = TypeVar("StatusT", bound=BaseModel)


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }
        if self.priority:
            out["priority"] = self.priority
        return out


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation.")
READY = PrinterColumn(
    "Ready", "string", '.status.conditions[?(@.type=="Ready")].status', "Ready condition."
)


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool
    spec_model: type[ApiModel]
    status_model: type[BaseModel]
    description: str
    columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("virtfleet",)
    #: Rules on the whole object (they may read metadata.name).
    root_rules: tuple[CelRule, ...] = field(default=())
    spec_required: bool = True

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{API_GROUP}"


_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)

_VM_NAME_RULE = CelRule(
    rule=f"self.metadata.name.size() <= 63 && self.metadata.name.matches('{DNS_LABEL_PATTERN}')",
    message="a VirtualMachine name must be a DNS label: at most 63 lowercase letters, "
    "digits and '-', starting and ending with a letter or digit",
    check=lambda obj: (
        obj.metadata.name is None
        or (len(obj.metadata.name) <= 63 and _DNS_LABEL.fullmatch(obj.metadata.name) is not None)
    ),
)


VIRTUAL_MACHINE = Kind(
    kind="VirtualMachine",
    plural="virtualmachines",
    singular="virtualmachine",
    short_names=("vm", "vms"),
    namespaced=True,
    spec_model=VirtualMachineSpec,
    status_model=VirtualMachineStatus,
    description="A virtual machine that should exist, converged on a node by virtfleet.",
    columns=(
        PrinterColumn("Status", "string", ".status.printableStatus", "What the VM is doing."),
        PrinterColumn("Node", "string", ".status.nodeName", "Node that holds the VM."),
        READY,
        AGE,
        PrinterColumn("Strategy", "string", ".spec.runStrategy", "Run strategy.", priority=1),
        PrinterColumn("Memory", "string", ".spec.memory.size", "Guest RAM.", priority=1),
        PrinterColumn("Restarts", "integer", ".status.restartCount", "Restarts.", priority=1),
        PrinterColumn(
            "IP",
            "string",
            ".status.interfaces[0].ipAddresses[0]",
            "First interface's address (guest agent).",
            priority=1,
        ),
        PrinterColumn(
            "OS", "string", ".status.guestOSInfo.prettyName", "From the guest agent.", priority=1
        ),
        PrinterColumn(
            "FailedOver",
            "string",
            ".status.failover.fromNode",
            "Last failed node it left.",
            priority=1,
        ),
    ),
    categories=("virtfleet", "all"),
    root_rules=(_VM_NAME_RULE,),
)

VM_SNAPSHOT = Kind(
    kind="VMSnapshot",
    plural="vmsnapshots",
    singular="vmsnapshot",
    short_names=("vmsnap", "vmsnaps"),
    namespaced=True,
    spec_model=VMSnapshotSpec,
    status_model=VMSnapshotStatus,
    description="A point-in-time snapshot of one VirtualMachine: disks, and memory when running.",
    columns=(
        PrinterColumn("VM", "string", ".spec.vmName", "Snapshotted VirtualMachine."),
        PrinterColumn("Phase", "string", ".status.phase", "Pending, InProgress, Ready, Failed."),
        PrinterColumn("ReadyToUse", "boolean", ".status.readyToUse", "Can be restored."),
        PrinterColumn("Memory", "boolean", ".status.memoryIncluded", "Includes RAM state."),
        PrinterColumn("Created", "date", ".status.creationTime", "When it was taken."),
        AGE,
    ),
)

VM_RESTORE = Kind(
    kind="VMRestore",
    plural="vmrestores",
    singular="vmrestore",
    short_names=("vmrestore", "vmrestores"),
    namespaced=True,
    spec_model=VMRestoreSpec,
    status_model=VMRestoreStatus,
    description="Bring a VirtualMachine back to a VMSnapshot, once.",
    columns=(
        PrinterColumn("VM", "string", ".spec.vmName", "Restored VirtualMachine."),
        PrinterColumn("Snapshot", "string", ".spec.snapshotName", "Snapshot restored."),
        PrinterColumn("Backup", "string", ".spec.backupName", "Backup restored."),
        PrinterColumn(
            "Phase", "string", ".status.phase", "Pending, InProgress, Succeeded, Failed."
        ),
        PrinterColumn("Restored", "date", ".status.restoreTime", "When the restore completed."),
        AGE,
    ),
)

VM_MIGRATION = Kind(
    kind="VMMigration",
    plural="vmmigrations",
    singular="vmmigration",
    short_names=("vmmig", "vmmigs"),
    namespaced=True,
    spec_model=VMMigrationSpec,
    status_model=VMMigrationStatus,
    description="Move one VirtualMachine to another node, live or offline.",
    columns=(
        PrinterColumn("VM", "string", ".spec.vmName", "Migrated VirtualMachine."),
        PrinterColumn("Phase", "string", ".status.phase", "Where the migration is."),
        PrinterColumn("Source", "string", ".status.sourceNode", "Node it leaves."),
        PrinterColumn("Target", "string", ".status.targetNode", "Node it goes to."),
        PrinterColumn("Progress", "integer", ".status.progress.percent", "Percent done."),
        AGE,
    ),
)

VM_HOST = Kind(
    kind="VMHost",
    plural="vmhosts",
    singular="vmhost",
    short_names=("vmhost", "vmhosts"),
    namespaced=False,
    spec_model=VMHostSpec,
    status_model=VMHostStatus,
    description="A node's hypervisor as its virtfleet agent sees it. Written by its agent, "
    "except status.health (the controller's view: Healthy, Failed, Fenced, Recovering).",
    columns=(
        READY,
        PrinterColumn("Health", "string", ".status.health.state", "Healthy, Failed, Fenced..."),
        PrinterColumn("VMs", "integer", ".status.vmCount", "VMs placed on the node."),
        PrinterColumn("CPUs", "integer", ".status.cpus", "Host logical CPUs."),
        PrinterColumn("Allocated", "string", ".status.allocatedMemory", "RAM promised to its VMs."),
        PrinterColumn("Memory", "string", ".status.memory", "Host RAM."),
        PrinterColumn("Free", "string", ".status.freeMemory", "Free host RAM."),
        PrinterColumn("Heartbeat", "date", ".status.heartbeatTime", "Last agent heartbeat."),
        PrinterColumn(
            "Libvirt", "string", ".status.libvirtVersion", "libvirt version.", priority=1
        ),
        PrinterColumn("QEMU", "string", ".status.qemuVersion", "QEMU version.", priority=1),
        AGE,
    ),
    spec_required=False,
)

VM_BACKUP_LOCATION = Kind(
    kind="VMBackupLocation",
    plural="vmbackuplocations",
    singular="vmbackuplocation",
    short_names=("vmbsl",),
    namespaced=True,
    spec_model=VMBackupLocationSpec,
    status_model=VMBackupLocationStatus,
    description="An S3-compatible bucket (and prefix) where VMBackups of the namespace go.",
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Available or Unavailable."),
        PrinterColumn("Bucket", "string", ".spec.bucket", "Bucket."),
        PrinterColumn("Prefix", "string", ".spec.prefix", "Key prefix."),
        PrinterColumn("Checked", "date", ".status.lastCheckedTime", "Last reachability check."),
        PrinterColumn("Endpoint", "string", ".spec.endpoint", "S3 endpoint.", priority=1),
        AGE,
    ),
)

VM_BACKUP = Kind(
    kind="VMBackup",
    plural="vmbackups",
    singular="vmbackup",
    short_names=("vmbackup", "vmbackups"),
    namespaced=True,
    spec_model=VMBackupSpec,
    status_model=VMBackupStatus,
    description="A copy of one VirtualMachine's disks in a VMBackupLocation, full or incremental.",
    columns=(
        PrinterColumn("VM", "string", ".spec.vmName", "Backed-up VirtualMachine."),
        PrinterColumn(
            "Phase", "string", ".status.phase", "Pending, InProgress, Uploading, Completed, Failed."
        ),
        PrinterColumn("Type", "string", ".status.type", "Full or Incremental."),
        PrinterColumn("Size", "integer", ".status.uploadedBytes", "Bytes uploaded."),
        PrinterColumn("Progress", "integer", ".status.progress.percent", "Percent done."),
        AGE,
        PrinterColumn("Parent", "string", ".status.parent", "Backup it builds on.", priority=1),
        PrinterColumn("Location", "string", ".spec.location", "VMBackupLocation.", priority=1),
    ),
)

VM_BACKUP_SCHEDULE = Kind(
    kind="VMBackupSchedule",
    plural="vmbackupschedules",
    singular="vmbackupschedule",
    short_names=("vmbsched",),
    namespaced=True,
    spec_model=VMBackupScheduleSpec,
    status_model=VMBackupScheduleStatus,
    description="VMBackups of one VirtualMachine on a schedule, pruned to a retention policy.",
    columns=(
        PrinterColumn("VM", "string", ".spec.vmName", "Backed-up VirtualMachine."),
        PrinterColumn("Schedule", "string", ".spec.schedule", "When."),
        PrinterColumn("Suspend", "boolean", ".spec.suspend", "No runs while true."),
        PrinterColumn("Last", "date", ".status.lastScheduleTime", "Last run."),
        PrinterColumn("Next", "date", ".status.nextScheduleTime", "Next run.", priority=1),
        PrinterColumn("Missed", "integer", ".status.missedRuns", "Runs missed.", priority=1),
        AGE,
    ),
)

VM_NETWORK = Kind(
    kind="VMNetwork",
    plural="vmnetworks",
    singular="vmnetwork",
    short_names=("vmnet", "vmnets"),
    namespaced=False,
    spec_model=VMNetworkSpec,
    status_model=VMNetworkStatus,
    description="An L2 segment VMs on any node share (a bridge + VXLAN per node), with "
    "addresses from the controller's IPAM; spec.namespaces says whose VMs may attach.",
    columns=(
        PrinterColumn("VNI", "integer", ".status.vni", "VXLAN network identifier in use."),
        PrinterColumn("Subnet", "string", ".spec.subnet", "IPv4 subnet of the IPAM."),
        PrinterColumn("Addresses", "integer", ".status.allocatedCount", "Addresses in use."),
        READY,
        AGE,
        PrinterColumn("Gateway", "string", ".spec.gateway", "Router address.", priority=1),
        PrinterColumn("MTU", "integer", ".spec.mtu", "MTU (unset: 1450).", priority=1),
    ),
)

KINDS: tuple[Kind, ...] = (
    VIRTUAL_MACHINE,
    VM_SNAPSHOT,
    VM_RESTORE,
    VM_MIGRATION,
    VM_HOST,
    VM_BACKUP_LOCATION,
    VM_BACKUP,
    VM_BACKUP_SCHEDULE,
    VM_NETWORK,
)
KINDS_BY_NAME = {k.kind: k for k in KINDS}


class ObjectMeta(BaseModel):
    """The parts of ``metadata`` virtfleet reads; the rest passes through untouched."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    deletion_timestamp: str | None = None
    owner_references: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _named(self) -> ObjectMeta:
        if not self.name and not self.generate_name:
            raise ValueError("metadata.name (or generateName) is required")
        return self


class Resource(BaseModel, Generic[SpecT, StatusT]):
    """A whole object of one kind, as stored by the apiserver."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["virtfleet.io/v1alpha1"] = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    #: Optional here because VMHost has none; the kinds that need one say so (``spec_required``).
    spec: SpecT | None = None
    status: StatusT | None = None


def resource_model(kind: Kind) -> type[Resource[Any, Any]]:
    """The pydantic model of a whole object of ``kind`` (spec and status typed)."""
    return Resource[kind.spec_model, kind.status_model]  # type: ignore[name-defined]
