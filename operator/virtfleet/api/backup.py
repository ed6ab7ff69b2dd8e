"""``VMBackupLocation`` and ``VMBackup``: copies of a VM's disks off the node, in S3.

A location says where (an S3-compatible bucket and prefix, with credentials from a Secret);
a backup is one copy of one VM's disks there, full or incremental, described by a manifest
written last, so the bucket alone is enough to restore (``docs/backups.md``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from virtfleet.api.base import ApiModel, CelRule, DnsLabel, DnsSubdomain, StatusModel
from virtfleet.api.conditions import Conditions
from virtfleet.api.quantity import Duration, Quantity
from virtfleet.api.snapshot import DeletionPolicy, SnapshotError, immutable_spec_rule

#: http(s)://host[:port][/path], printable ASCII, no credentials in the URL.
ENDPOINT_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)"
    r"(:[0-9]{1,5})?(/[!-~]*)?$"
)
#: S3's bucket naming rules (3-63 lowercase letters, digits, dots, hyphens).
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class CredentialsSecretRef(ApiModel):
    """A Secret in the location's namespace holding the S3 access key pair."""

    name: DnsSubdomain = Field(description="Secret in the same namespace as the location.")
    access_key_id_key: Annotated[str, StringConstraints(max_length=253)] = Field(
        default="accessKeyID", description="Key of the access key id (default accessKeyID)."
    )
    secret_access_key_key: Annotated[str, StringConstraints(max_length=253)] = Field(
        default="secretAccessKey",
        description="Key of the secret access key (default secretAccessKey).",
    )


class VMBackupLocationSpec(ApiModel):
    endpoint: Annotated[str, StringConstraints(pattern=ENDPOINT_PATTERN, max_length=2048)] = Field(
        description="S3 endpoint URL, e.g. https://s3.example.com or http://127.0.0.1:9000."
    )
    bucket: Annotated[str, StringConstraints(pattern=BUCKET_PATTERN)] = Field(
        description="Bucket that holds the backups; it must exist."
    )
    prefix: Annotated[str, StringConstraints(max_length=512)] = Field(
        default="", description="Key prefix inside the bucket (several clusters may share one)."
    )
    region: Annotated[str, StringConstraints(max_length=64)] = Field(
        default="us-east-1", description="S3 region (default us-east-1)."
    )
    credentials_secret: CredentialsSecretRef
    ca_bundle: Annotated[str, StringConstraints(max_length=65536)] | None = Field(
        default=None, description="PEM CA certificates to trust for an https endpoint."
    )
    bandwidth_limit: Quantity | None = Field(
        default=None, description="Upload and download rate limit in bytes per second, e.g. 50Mi."
    )
    check_interval: Duration | None = Field(
        default=None, description="How often reachability is checked (default 1m)."
    )

    cel_rules = (
        CelRule(
            rule="!has(self.prefix) || "
            "(!self.prefix.startsWith('/') && !self.prefix.contains('..'))",
            message="prefix must not start with '/' nor contain '..'",
            check=lambda s: not s.prefix.startswith("/") and ".." not in s.prefix,
            field_path=".prefix",
        ),
    )


class LocationPhase(StrEnum):
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"


class VMBackupLocationStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: LocationPhase | None = None
    message: str | None = Field(default=None, description="Why it is unavailable.")
    last_checked_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    last_available_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    backup_count: int | None = Field(
        default=None, ge=0, description="Backups found in the bucket under the prefix."
    )
    conditions: Conditions


class BackupMode(StrEnum):
    AUTO = "Auto"
    FULL = "Full"
    INCREMENTAL = "Incremental"


class BackupType(StrEnum):
    FULL = "Full"
    INCREMENTAL = "Incremental"


class BackupPhase(StrEnum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    UPLOADING = "Uploading"
    COMPLETED = "Completed"
    FAILED = "Failed"


class VMBackupSpec(ApiModel):
    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    location: DnsSubdomain = Field(description="VMBackupLocation in the same namespace.")
    mode: BackupMode = Field(
        default=BackupMode.AUTO,
        description="Auto (default): incremental when the VM's previous backup to this "
        "location left a checkpoint, else full. Full: always all data. Incremental: only "
        "blocks changed since the previous backup; Failed when there is no checkpoint.",
    )
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.DELETE,
        description="Delete (default) removes the backup's objects with this object; "
        "Retain keeps them in the bucket.",
    )

    cel_rules = (immutable_spec_rule(),)


class BackupProgress(StatusModel):
    bytes_total: int | None = Field(default=None, ge=0)
    bytes_done: int | None = Field(default=None, ge=0)
    percent: int | None = Field(default=None, ge=0, le=100)


class BackupDiskStatus(StatusModel):
    name: str = Field(description="Disk name in the VM's spec.")
    object_key: str | None = Field(default=None, description="Object holding its data.")
    virtual_size: int | None = Field(default=None, ge=0, description="Disk size seen by the guest.")
    uploaded_bytes: int | None = Field(default=None, ge=0)
    sha256: str | None = None


class VMBackupStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: BackupPhase | None = None
    type: BackupType | None = None
    parent: str | None = Field(default=None, description="Backup this incremental builds on.")
    checkpoint: str | None = Field(
        default=None,
        description="libvirt checkpoint the next incremental starts from; none for a "
        "stopped VM's backup (its volumes were copied whole).",
    )
    node_name: str | None = None
    vm_uid: str | None = Field(default=None, alias="vmUID")
    attempt: int | None = Field(default=None, ge=0, description="Tries so far (a crash retries).")
    progress: BackupProgress | None = None
    size_bytes: int | None = Field(default=None, ge=0, description="Sum of the disks' sizes.")
    uploaded_bytes: int | None = Field(default=None, ge=0)
    object_prefix: str | None = Field(default=None, description="Where its objects are.")
    disks: list[BackupDiskStatus] = Field(default_factory=list)
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    synced: bool | None = Field(
        default=None,
        description="Found in the bucket (not made by this cluster): read-only, restorable.",
    )
    error: SnapshotError | None = None
    conditions: Conditions
