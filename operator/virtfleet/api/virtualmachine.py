"""``VirtualMachine``: a VM that should exist, and what the node reports about it."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from virtfleet.api.base import (
    ApiModel,
    CelRule,
    DnsLabel,
    DnsSubdomain,
    StatusModel,
    StoreName,
    no_dot_dot,
)
from virtfleet.api.conditions import Conditions
from virtfleet.api.quantity import QUANTITY_PATTERN, Quantity
from virtfleet.identity import is_derived_range

MIN_MEMORY = Quantity("16Mi")
#: Far above any host here; bounded so a typo (or ``1e30``) is refused instead of being
#: counted against a node's capacity.
MAX_MEMORY = Quantity("16Ti")
MIN_DISK = Quantity("1Mi")
#: qcow2's own limit with 64 KiB clusters is 256 TiB.
MAX_DISK = Quantity("256Ti")
MAX_VCPUS = 512
#: 16 would push the size rule (quantity parsing per disk) past the apiserver's CEL cost budget.
MAX_DISKS = 12
MAX_INTERFACES = 8

MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
MacAddress = Annotated[str, StringConstraints(pattern=MAC_PATTERN, max_length=17)]

#: Printable text only: a control character in a kernel command line is never intended,
#: and libvirt does not round-trip some of them (CR), which would look like drift forever.
#: U+FFFE and U+FFFF are not XML characters: libvirt would refuse the domain on the node.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f\x{fffe}\x{ffff}]*$"

#: The CRD has no defaults (DESIGN §3.1), so CEL treats an absent field as its default.
_INTERFACE_TYPE = "(has(self.type) ? self.type : 'user')"


class RunStrategy(StrEnum):
    """KubeVirt's run strategies, with KubeVirt's meanings."""

    ALWAYS = "Always"  # keep running; restart after any stop, even a guest poweroff
    RERUN_ON_FAILURE = "RerunOnFailure"  # restart after a crash, not after a clean poweroff
    ONCE = "Once"  # start once; never restart
    MANUAL = "Manual"  # start/stop only through explicit actions
    HALTED = "Halted"  # keep stopped


class EvictionStrategy(StrEnum):
    NONE = "None"
    LIVE_MIGRATE = "LiveMigrate"


class FirmwareType(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"


class InterfaceType(StrEnum):
    USER = "user"
    BRIDGE = "bridge"
    NETWORK = "network"


class InterfaceModel(StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    E1000E = "e1000e"
    RTL8139 = "rtl8139"


def _quantity_between(minimum: Quantity, maximum: Quantity) -> str:
    """One CEL rule per field, guarded by the bounded pattern.

    The apiserver runs CEL even when the field failed its pattern (only type errors stop
    it), so without the guard ``quantity('1e100000000')`` would compute the number. The
    field is a plain string (not int-or-string) so the cost estimator knows its length.
    """
    return (
        f"!self.size.matches(r'{QUANTITY_PATTERN}') || "
        f"(quantity(self.size).compareTo(quantity('{minimum.text}')) >= 0 && "
        f"quantity(self.size).compareTo(quantity('{maximum.text}')) <= 0)"
    )


class Cpu(ApiModel):
    """Guest CPU topology and model."""

    cores: int = Field(default=1, ge=1, le=MAX_VCPUS, description="Cores per socket. Default 1.")
    sockets: int = Field(default=1, ge=1, le=MAX_VCPUS, description="Sockets. Default 1.")
    threads: int = Field(default=1, ge=1, le=MAX_VCPUS, description="Threads per core. Default 1.")
    model: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
        | None
    ) = Field(
        default=None,
        description="host-model, host-passthrough or a named QEMU CPU model; "
        "unset means the hypervisor's default (works under TCG).",
    )

    cel_rules = (
        CelRule(
            rule="(has(self.cores) ? self.cores : 1) * (has(self.sockets) ? self.sockets : 1)"
            f" * (has(self.threads) ? self.threads : 1) <= {MAX_VCPUS}",
            message=f"cores * sockets * threads must be at most {MAX_VCPUS}",
            check=lambda c: c.cores * c.sockets * c.threads <= MAX_VCPUS,
        ),
    )

    @property
    def vcpus(self) -> int:
        return self.cores * self.sockets * self.threads


class Memory(ApiModel):
    size: Quantity = Field(
        description=f"Guest RAM, e.g. 512Mi or 2Gi. At least {MIN_MEMORY}, at most {MAX_MEMORY}."
    )

    cel_rules = (
        CelRule(
            rule=_quantity_between(MIN_MEMORY, MAX_MEMORY),
            message=f"memory.size must be at least {MIN_MEMORY} and at most {MAX_MEMORY}",
            check=lambda m: MIN_MEMORY.bytes <= m.size.bytes <= MAX_MEMORY.bytes,
            field_path=".size",
        ),
    )


class Firmware(ApiModel):
    type: FirmwareType = Field(default=FirmwareType.BIOS, description="bios (default) or uefi.")


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


class DiskSource(ApiModel):
    """Exactly one of ``image``, ``blank`` or ``http``."""

    image: StoreName | None = Field(
        default=None,
        description="Name of an image in the node's image store; the disk is a "
        "copy-on-write overlay on it.",
    )
    blank: BlankSource | None = Field(default=None, description="An empty disk of spec size.")
    http: HttpSource | None = Field(default=None, description="An image downloaded by the node.")

    cel_rules = (
        CelRule(
            rule="[has(self.image), has(self.blank), has(self.http)].filter(x, x).size() == 1",
            message="a disk source needs exactly one of image, blank or http",
            check=lambda s: sum(x is not None for x in (s.image, s.blank, s.http)) == 1,
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
            rule=f"!has(self.size) || {_quantity_between(MIN_DISK, MAX_DISK)}",
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


class KernelBoot(ApiModel):
    """Direct kernel boot from images in the node's image store."""

    image: StoreName = Field(description="Kernel image name in the node's image store.")
    initrd: StoreName | None = Field(default=None, description="Initrd image name, optional.")
    cmdline: (
        Annotated[str, StringConstraints(max_length=4096, pattern=PRINTABLE_PATTERN)] | None
    ) = Field(default=None, description="Kernel command line (printable characters only).")

    cel_rules = (
        CelRule(
            rule="!self.image.contains('..') && (!has(self.initrd) || !self.initrd.contains('..'))",
            message="kernel image and initrd must be names in the node's image store, without '..'",
            check=lambda k: no_dot_dot(k.image) and no_dot_dot(k.initrd),
        ),
    )


class SecretKeyRef(ApiModel):
    name: DnsSubdomain = Field(description="Secret in the VM's namespace.")
    key: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)] = Field(
        default="userdata", description="Key inside the Secret. Default userdata."
    )


class CloudInit(ApiModel):
    """A NoCloud seed disk: user-data inline or from a Secret, and optional network-config."""

    user_data: Annotated[str, StringConstraints(max_length=65536)] | None = None
    user_data_secret_ref: SecretKeyRef | None = None
    network_data: Annotated[str, StringConstraints(max_length=65536)] | None = None

    cel_rules = (
        CelRule(
            rule="!(has(self.userData) && has(self.userDataSecretRef))",
            message="set userData or userDataSecretRef, not both",
            check=lambda c: not (c.user_data is not None and c.user_data_secret_ref is not None),
        ),
    )


class Bandwidth(ApiModel):
    """Traffic shaping of one direction (libvirt ``<bandwidth>``; kilobytes per second)."""

    average_kbps: int = Field(ge=1, le=2**32 - 1, alias="averageKBps")
    peak_kbps: int | None = Field(default=None, ge=1, le=2**32 - 1, alias="peakKBps")
    burst_kb: int | None = Field(default=None, ge=1, le=2**32 - 1, alias="burstKB")


class InterfaceBandwidth(ApiModel):
    inbound: Bandwidth | None = None
    outbound: Bandwidth | None = None


class Interface(ApiModel):
    name: DnsLabel = Field(description="Unique among the VM's interfaces (a DNS label).")
    type: InterfaceType = Field(
        default=InterfaceType.USER,
        description="user (default; QEMU's user-mode network, which cannot reach the node "
        "itself unless the node admin allows it), bridge or network.",
    )
    bridge: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=15)]
        | None
    ) = Field(
        default=None,
        description="Host bridge name, for type bridge; the node admin allows bridges per "
        "namespace (else Stalled: NetworkNotAllowed).",
    )
    network: StoreName | None = Field(
        default=None,
        description="libvirt network, for type network; allowed per namespace like bridges.",
    )
    model: InterfaceModel = Field(
        default=InterfaceModel.VIRTIO, description="NIC model. Default virtio."
    )
    mac_address: MacAddress | None = Field(
        default=None,
        description="Unicast MAC; unset means one derived from the VM's uid and this name.",
    )
    bandwidth: InterfaceBandwidth | None = None

    cel_rules = (
        CelRule(
            rule=f"{_INTERFACE_TYPE} == 'bridge' ? has(self.bridge) : !has(self.bridge)",
            message="bridge is required for type bridge and only allowed there",
            check=lambda i: (i.bridge is not None) == (i.type == InterfaceType.BRIDGE),
        ),
        CelRule(
            rule=f"{_INTERFACE_TYPE} == 'network' ? has(self.network) : !has(self.network)",
            message="network is required for type network and only allowed there",
            check=lambda i: (i.network is not None) == (i.type == InterfaceType.NETWORK),
        ),
        CelRule(
            rule=f"!has(self.bandwidth) || {_INTERFACE_TYPE} != 'user'",
            message="bandwidth cannot be applied to type user interfaces; "
            "use a bridge or network interface",
            check=lambda i: i.bandwidth is None or i.type != InterfaceType.USER,
        ),
        CelRule(
            rule="!has(self.macAddress) || self.macAddress.matches('^.[02468aceACE]')",
            message="macAddress must be a unicast address (first octet even), "
            "e.g. 02:00:00:00:00:01",
            check=lambda i: i.mac_address is None or int(i.mac_address[:2], 16) % 2 == 0,
            field_path=".macAddress",
        ),
        CelRule(
            rule="!has(self.macAddress) || !self.macAddress.matches('^.[eE]')",
            message="macAddress with a first octet ending in e (0e:, 1e:, ... fe:) is "
            "reserved for derived MACs; use another (e.g. 02:...) or leave it unset",
            check=lambda i: i.mac_address is None or not is_derived_range(i.mac_address),
            field_path=".macAddress",
        ),
    )


def _unique(values: list[object]) -> bool:
    return len(values) == len(set(values))


class VirtualMachineSpec(ApiModel):
    run_strategy: RunStrategy = Field(
        default=RunStrategy.ALWAYS,
        description="Always (default), RerunOnFailure, Once, Manual or Halted "
        "(KubeVirt's meanings).",
    )
    node_name: DnsSubdomain | None = Field(default=None, description="Pin the VM to this node.")
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, description="Labels a Node must have to run this VM."
    )
    eviction_strategy: EvictionStrategy = Field(
        default=EvictionStrategy.NONE,
        description="What a node drain does: None (default; reported, not moved) or LiveMigrate.",
    )
    cpu: Cpu = Field(default_factory=Cpu)
    memory: Memory
    machine: (
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)] | None
    ) = Field(
        default=None, description="QEMU machine type, e.g. q35 or pc; unset means the default."
    )
    firmware: Firmware = Field(default_factory=Firmware)
    disks: list[Disk] = Field(
        default_factory=list,
        max_length=MAX_DISKS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    kernel: KernelBoot | None = None
    cloud_init: CloudInit | None = None
    interfaces: list[Interface] = Field(
        default_factory=list,
        max_length=MAX_INTERFACES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    termination_grace_period_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="ACPI shutdown first; the domain is destroyed after this many "
        "seconds. Default 30.",
    )

    cel_rules = (
        CelRule(
            rule="!has(self.disks) || self.disks.all(d, !has(d.bootOrder) || "
            "self.disks.filter(e, has(e.bootOrder) && e.bootOrder == d.bootOrder).size() == 1)",
            message="bootOrder values must be unique among disks",
            check=lambda s: _unique([d.boot_order for d in s.disks if d.boot_order is not None]),
        ),
        CelRule(
            rule="!has(self.interfaces) || self.interfaces.all(i, !has(i.macAddress) || "
            "self.interfaces.filter(j, has(j.macAddress) && "
            "j.macAddress.lowerAscii() == i.macAddress.lowerAscii()).size() == 1)",
            message="macAddress values must be unique among interfaces",
            check=lambda s: _unique(
                [i.mac_address.lower() for i in s.interfaces if i.mac_address is not None]
            ),
        ),
        # The apiserver enforces these two through the list-map keys; offline we say it ourselves.
        CelRule(
            rule=None,
            message="disk names must be unique",
            check=lambda s: _unique([d.name for d in s.disks]),
        ),
        CelRule(
            rule=None,
            message="interface names must be unique",
            check=lambda s: _unique([i.name for i in s.interfaces]),
        ),
    )


class PrintableStatus(StrEnum):
    STOPPED = "Stopped"
    SCHEDULING = "Scheduling"
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPING = "Stopping"
    MIGRATING = "Migrating"
    TERMINATING = "Terminating"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


class InterfaceStatus(StatusModel):
    name: str
    mac: str
    ip: str | None = None


class VirtualMachineStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    printable_status: PrintableStatus | None = Field(
        default=None, description="What the VM is doing, in one word."
    )
    node_name: str | None = Field(default=None, description="Node that holds the domain.")
    domain_uuid: str | None = Field(
        default=None, alias="domainUUID", description="libvirt domain UUID (= metadata.uid)."
    )
    restart_count: int = Field(default=0, ge=0, description="Restarts done by the run strategy.")
    last_start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    consecutive_failures: int = Field(
        default=0, ge=0, description="Stops soon after a start, in a row; drives the back-off."
    )
    crash_loop_retry_time: str | None = Field(
        default=None,
        description="While in CrashLoopBackOff: when the next start is tried.",
        json_schema_extra={"format": "date-time"},
    )
    last_power_request: str | None = Field(
        default=None,
        description="Id of the last imperative power request handled "
        "(annotation virtfleet.io/power-request), so each acts once.",
    )
    interfaces: list[InterfaceStatus] = Field(default_factory=list)
    conditions: Conditions
