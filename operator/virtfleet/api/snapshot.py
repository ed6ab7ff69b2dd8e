"""``VMSnapshot`` and ``VMRestore``: point-in-time copies of a VM and bringing them back."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from virtfleet.api.base import ApiModel, CelRule, DnsLabel, DnsSubdomain, StatusModel
from virtfleet.api.conditions import Conditions
from virtfleet.api.quantity import Duration

IMMUTABLE_SPEC = "spec is immutable; create a new object instead"


def immutable_spec_rule() -> CelRule:
    """One-shot objects (snapshots, restores, migrations) never change what they ask for."""
    return CelRule(
        rule="self == oldSelf", message=IMMUTABLE_SPEC, check=lambda _: True, transition=True
    )


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class SnapshotPhase(StrEnum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    READY = "Ready"
    FAILED = "Failed"


class VMSnapshotSpec(ApiModel):
    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    include_memory: bool | None = Field(
        default=None,
        description="Save RAM and device state too, so a restore resumes the running guest. "
        "Unset means true when the VM runs and quiesce is off; a stopped VM has no memory "
        "to save.",
    )
    quiesce: bool = Field(
        default=False,
        description="Freeze the guest's filesystems (through the QEMU guest agent) while the "
        "disks are captured, so a boot from them finds them clean. For disks-only snapshots: "
        "one with memory is consistent by itself. Without a connected agent the snapshot is "
        "still taken and status says why it was not quiesced.",
    )
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.DELETE,
        description="Delete (default) removes the libvirt snapshot with this object; "
        "Retain keeps it.",
    )
    failure_deadline: Duration | None = Field(
        default=None, description="Give up (phase Failed) when not Ready within this time, e.g. 5m."
    )

    cel_rules = (
        immutable_spec_rule(),
        CelRule(
            rule="!has(self.quiesce) || !self.quiesce || !has(self.includeMemory) "
            "|| !self.includeMemory",
            message="quiesce is for disks-only snapshots (a snapshot with memory resumes the "
            "guest exactly and needs no freeze; a restore would resume it frozen): set "
            "includeMemory: false or drop quiesce",
            check=lambda s: not (s.quiesce and s.include_memory),
        ),
    )


class SnapshotIndication(StrEnum):
    """What the snapshot's guest was like when it was taken (KubeVirt's indications)."""

    #: The VM was running: disks captured live.
    ONLINE = "Online"
    #: The guest agent was connected.
    GUEST_AGENT = "GuestAgent"
    #: Quiesce was asked for, but no guest agent was connected: crash-consistent only.
    NO_GUEST_AGENT = "NoGuestAgent"
    #: Quiesce was asked for and the agent failed to freeze: crash-consistent only.
    QUIESCE_FAILED = "QuiesceFailed"


class SnapshotDiskStatus(StatusModel):
    name: str = Field(description="Disk name in the VM's spec.")
    size_bytes: int | None = Field(
        default=None, ge=0, description="Virtual size of the disk when the snapshot was taken."
    )
    allocation_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Bytes the disk's image used on the node, snapshots included.",
    )


class SnapshotError(StatusModel):
    message: str
    time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})


class VMSnapshotStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: SnapshotPhase | None = None
    ready_to_use: bool | None = None
    creation_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    node_name: str | None = None
    snapshot_name: str | None = Field(
        default=None,
        description="Name of the libvirt snapshot: derived from this object's uid, so it is "
        "unique and taking it again after a crash finds the same one.",
    )
    vm_uid: str | None = Field(
        default=None, alias="vmUID", description="uid of the VirtualMachine it was taken of."
    )
    memory_included: bool | None = Field(
        default=None, description="A restore resumes the guest at the snapshot's moment."
    )
    domain_state: str | None = Field(
        default=None, description="State of the domain libvirt recorded (running, shutoff)."
    )
    disks: list[SnapshotDiskStatus] = Field(default_factory=list)
    quiesced: bool | None = Field(
        default=None,
        description="The guest's filesystems were frozen while its disks were captured.",
    )
    indications: list[SnapshotIndication] = Field(
        default_factory=list,
        description="Online, GuestAgent, NoGuestAgent, QuiesceFailed: the guest's state at "
        "the snapshot.",
    )
    snapshot_xml: str | None = Field(
        default=None,
        alias="snapshotXML",
        max_length=1_000_000,
        description="libvirt's description of the snapshot, to re-create its metadata when "
        "the node lost it (the data itself lives in the VM's qcow2 disks).",
    )
    error: SnapshotError | None = None
    conditions: Conditions


class RestorePhase(StrEnum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class VMRestoreSpec(ApiModel):
    """Exactly one source: a ``snapshotName`` (restored into the VM, in place) or a
    ``backupName`` (restored as a new VM named ``vmName``, on any node; or, when ``vmName``
    is the existing VM the backup was taken of, into it: its disks replaced while it is
    stopped)."""

    vm_name: DnsLabel = Field(
        description="With snapshotName: the VirtualMachine in the same namespace to restore. "
        "With backupName: the new VirtualMachine to create from the backup, or the existing "
        "VirtualMachine the backup was taken of (its disks are replaced once it is stopped)."
    )
    snapshot_name: DnsLabel | None = Field(
        default=None, description="VMSnapshot of that VM to bring back."
    )
    backup_name: DnsSubdomain | None = Field(
        default=None, description="VMBackup (Completed) in the same namespace to restore from."
    )
    node_name: DnsSubdomain | None = Field(
        default=None,
        description="With backupName: pin the new VM to this node (default: placed like any "
        "new VM).",
    )

    cel_rules = (
        immutable_spec_rule(),
        CelRule(
            rule="has(self.snapshotName) != has(self.backupName)",
            message="a restore needs exactly one of snapshotName or backupName",
            check=lambda s: (s.snapshot_name is None) != (s.backup_name is None),
        ),
        CelRule(
            rule="!has(self.nodeName) || has(self.backupName)",
            message="nodeName places a VM restored from a backup; a snapshot restore stays "
            "where its VM is",
            check=lambda s: s.node_name is None or s.backup_name is not None,
            field_path=".nodeName",
        ),
    )


class VMRestoreStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: RestorePhase | None = None
    complete: bool | None = None
    restore_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    start_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the restore was committed to (recorded before anything was done).",
    )
    node_name: str | None = None
    vm_uid: str | None = Field(default=None, alias="vmUID", description="uid of the restored VM.")
    snapshot_name: str | None = Field(
        default=None, description="Name of the libvirt snapshot brought back."
    )
    vm_created: bool | None = Field(
        default=None, description="From a backup: this restore created the VirtualMachine."
    )
    attempt: int | None = Field(
        default=None,
        ge=0,
        description="From a backup into an existing VM: tries so far (a failed read retries).",
    )
    disks_replacing: bool | None = Field(
        default=None,
        description="From a backup into an existing VM: the replacement of its disks began "
        "(a failure from then on keeps the VM stopped until this VMRestore is deleted).",
    )
    memory_restored: bool | None = Field(
        default=None,
        description="True: the guest resumes at the snapshot's moment. False: disks only; "
        "the run strategy decides whether the VM starts.",
    )
    error: SnapshotError | None = None
    conditions: Conditions
