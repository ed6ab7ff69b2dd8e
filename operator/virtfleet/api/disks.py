"""The disks of a VirtualMachine: where each comes from, its bus, size and I/O limits."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from virtfleet.api.base import ApiModel, CelRule, DnsLabel, DnsSubdomain, StoreName, no_dot_dot
from virtfleet.api.cel import quantity_between
from virtfleet.api.quantity import Quantity

MIN_DISK = Quantity("1Mi")
#: qcow2's own limit with 64 KiB clusters is 256 TiB.
MAX_DISK = Quantity("256Ti")


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"


class BlankSource(ApiModel):
    """An empty disk of ``size``."""


#: What ``hypervisor.download.check_url`` accepts, at apply time: printable ASCII, a host
#: (name, IPv4 or bracketed IPv6) without credentials, an optional numeric port.
HTTP_URL_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)"
    r"(:[0-9]{1,5})?([/?#][!-~]*)?$"
)


class HttpSource(ApiModel):
    url: Annotated[str, StringConstraints(pattern=HTTP_URL_PATTERN, max_length=2048)] = Field(
        description="Where the node downloads the image from: http(s)://host[:port]/path, "
        "printable ASCII, no credentials."
    )
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="Expected SHA-256 of the download, lowercase hex; a mismatch is refused."
    )


class BackupSource(ApiModel):
    """The disk's contents as a VMBackup saved them (a restore as a new VM writes this)."""

    backup_name: DnsSubdomain = Field(description="VMBackup in the VM's namespace.")
    disk: DnsLabel = Field(description="Name of the disk in the backed-up VM.")


class DiskSource(ApiModel):
    """Exactly one of ``image``, ``blank``, ``http`` or ``backup``."""

    image: StoreName | None = Field(
        default=None,
        description="Name of an image in the node's image store; the disk is a "
        "copy-on-write overlay on it.",
    )
    blank: BlankSource | None = Field(default=None, description="An empty disk of spec size.")
    http: HttpSource | None = Field(default=None, description="An image downloaded by the node.")
    backup: BackupSource | None = Field(
        default=None, description="Data of a VMBackup, downloaded from its location."
    )

    cel_rules = (
        CelRule(
            rule="[has(self.image), has(self.blank), has(self.http), has(self.backup)]"
            ".filter(x, x).size() == 1",
            message="a disk source needs exactly one of image, blank, http or backup",
            check=lambda s: sum(x is not None for x in (s.image, s.blank, s.http, s.backup)) == 1,
        ),
        CelRule(
            rule="!has(self.image) || !self.image.contains('..')",
            message="image must be a name in the node's image store, without '..'",
            check=lambda s: no_dot_dot(s.image),
            field_path=".image",
        ),
    )


#: Largest I/O limit QEMU takes (THROTTLE_VALUE_MAX; libvirt's QEMU_BLOCK_IOTUNE_MAX): a
#: larger one would be accepted here and fail only when the domain starts.
IOTUNE_MAX = 10**15


class IoTune(ApiModel):
    """Disk I/O limits (libvirt ``<iotune>``); total and read/write limits exclude each other."""

    total_bytes_sec: int | None = Field(default=None, ge=0, le=IOTUNE_MAX)
    read_bytes_sec: int | None = Field(default=None, ge=0, le=IOTUNE_MAX)
    write_bytes_sec: int | None = Field(default=None, ge=0, le=IOTUNE_MAX)
    total_iops_sec: int | None = Field(default=None, ge=0, le=IOTUNE_MAX)
    read_iops_sec: int | None = Field(default=None, ge=0, le=IOTUNE_MAX)
    write_iops_sec: int | None = Field(default=None, ge=0, le=IOTUNE_MAX)

    cel_rules = (
        CelRule(
            rule="!(has(self.totalBytesSec) && "
            "(has(self.readBytesSec) || has(self.writeBytesSec)))",
            message="totalBytesSec cannot be combined with readBytesSec or writeBytesSec",
            check=lambda t: (
                not (
                    t.total_bytes_sec is not None
                    and (t.read_bytes_sec is not None or t.write_bytes_sec is not None)
                )
            ),
        ),
        CelRule(
            rule="!(has(self.totalIopsSec) && (has(self.readIopsSec) || has(self.writeIopsSec)))",
            message="totalIopsSec cannot be combined with readIopsSec or writeIopsSec",
            check=lambda t: (
                not (
                    t.total_iops_sec is not None
                    and (t.read_iops_sec is not None or t.write_iops_sec is not None)
                )
            ),
        ),
    )


class Disk(ApiModel):
    name: DnsLabel = Field(description="Unique among the VM's disks (a DNS label).")
    bus: DiskBus = Field(default=DiskBus.VIRTIO, description="virtio (default), sata or scsi.")
    size: Quantity | None = Field(
        default=None,
        description="Virtual size. Required for blank disks; grows an image overlay when larger.",
    )
    boot_order: int | None = Field(
        default=None, ge=1, le=64, description="Boot priority (1 first); unique among disks."
    )
    read_only: bool = Field(default=False, description="Attach read-only. Default false.")
    source: DiskSource
    pool: StoreName | None = Field(
        default=None,
        description="Storage pool on the node that holds this disk; unset means the node's "
        "default pool.",
    )
    iotune: IoTune | None = None

    cel_rules = (
        CelRule(
            rule="!has(self.source.blank) || has(self.size)",
            message="a blank disk needs a size",
            check=lambda d: d.source.blank is None or d.size is not None,
        ),
        CelRule(
            rule=f"!has(self.size) || {quantity_between(MIN_DISK, MAX_DISK)}",
            message=f"disk size must be at least {MIN_DISK} and at most {MAX_DISK}",
            check=lambda d: d.size is None or MIN_DISK.bytes <= d.size.bytes <= MAX_DISK.bytes,
            field_path=".size",
        ),
        CelRule(
            rule="!(has(self.bus) && self.bus == 'sata' && has(self.readOnly) && self.readOnly)",
            message="a sata disk cannot be readOnly (QEMU refuses read-only SATA disks); "
            "use bus virtio or scsi",
            check=lambda d: not (d.bus == DiskBus.SATA and d.read_only),
        ),
        CelRule(
            rule="!has(self.pool) || !self.pool.contains('..')",
            message="pool must be the name of a storage pool on the node, without '..'",
            check=lambda d: no_dot_dot(d.pool),
            field_path=".pool",
        ),
    )
