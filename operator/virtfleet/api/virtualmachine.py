"""``VirtualMachine``: a VM that should exist, and what the node reports about it.

Its disks are modelled in :mod:`virtfleet.api.disks` and its network interfaces in
:mod:`virtfleet.api.interfaces`; their public names are re-exported here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from virtfleet.api.base import (
    ApiModel,
    CelRule,
    DnsSubdomain,
    StatusModel,
    StoreName,
    no_dot_dot,
)
from virtfleet.api.cel import quantity_between
from virtfleet.api.conditions import Conditions
from virtfleet.api.disks import HTTP_URL_PATTERN as HTTP_URL_PATTERN
from virtfleet.api.disks import IOTUNE_MAX as IOTUNE_MAX
from virtfleet.api.disks import MAX_DISK as MAX_DISK
from virtfleet.api.disks import MIN_DISK as MIN_DISK
from virtfleet.api.disks import BlankSource as BlankSource
from virtfleet.api.disks import Disk as Disk
from virtfleet.api.disks import DiskBus as DiskBus
from virtfleet.api.disks import DiskSource as DiskSource
from virtfleet.api.disks import HttpSource as HttpSource
from virtfleet.api.disks import IoTune as IoTune
from virtfleet.api.interfaces import MAC_PATTERN as MAC_PATTERN
from virtfleet.api.interfaces import Bandwidth as Bandwidth
from virtfleet.api.interfaces import Interface as Interface
from virtfleet.api.interfaces import InterfaceBandwidth as InterfaceBandwidth
from virtfleet.api.interfaces import InterfaceModel as InterfaceModel
from virtfleet.api.interfaces import InterfaceType as InterfaceType
from virtfleet.api.interfaces import MacAddress as MacAddress
from virtfleet.api.quantity import Quantity

MIN_MEMORY = Quantity("16Mi")
#: Far above any host here; bounded so a typo (or ``1e30``) is refused instead of being
#: counted against a node's capacity.
MAX_MEMORY = Quantity("16Ti")
MAX_VCPUS = 512
#: 16 would push the size rule (quantity parsing per disk) past the apiserver's CEL cost budget.
MAX_DISKS = 12
MAX_INTERFACES = 8

#: Printable text only: a control character in a kernel command line is never intended,
#: and libvirt does not round-trip some of them (CR), which would look like drift forever.
#: U+FFFE and U+FFFF are not XML characters: libvirt would refuse the domain on the node.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f\x{fffe}\x{ffff}]*$"


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


class HighAvailability(StrEnum):
    """What happens to the VM when its node fails and is fenced (docs/failover.md)."""

    NONE = "None"  # stay on the failed node (Unknown) until it returns
    RESTART = "Restart"  # disks in a shared pool: start on another node from the same disks
    RESTORE_FROM_BACKUP = "RestoreFromBackup"  # node-local disks: the latest completed VMBackup


class FirmwareType(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


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
            rule=quantity_between(MIN_MEMORY, MAX_MEMORY),
            message=f"memory.size must be at least {MIN_MEMORY} and at most {MAX_MEMORY}",
            check=lambda m: MIN_MEMORY.bytes <= m.size.bytes <= MAX_MEMORY.bytes,
            field_path=".size",
        ),
    )


class Firmware(ApiModel):
    type: FirmwareType = Field(default=FirmwareType.BIOS, description="bios (default) or uefi.")


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
    high_availability: HighAvailability = Field(
        default=HighAvailability.NONE,
        description="When the VM's node fails and is fenced: None (default; the VM stays "
        "Unknown until the node returns), Restart (start it on another node from the same "
        "disks; every writable disk must be in a shared pool) or RestoreFromBackup (restore "
        "its latest completed VMBackup on another node; data since that backup is lost).",
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
    ip: str | None = Field(
        default=None,
        description="The interface's address on its VMNetwork (the controller's IPAM "
        "record): virtfleet's word, unlike ipAddresses.",
    )
    network: str | None = Field(
        default=None, description="The VMNetwork this interface is attached to (type network)."
    )
    interface_name: str | None = Field(
        default=None,
        max_length=256,
        description="Its name inside the guest (the guest agent's word).",
    )
    ip_addresses: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="The addresses the guest agent reports on it (the guest's word; no "
        "loopback, no link-local), IPv4 first.",
    )


_GuestText = Annotated[str, StringConstraints(max_length=256)]


class GuestFilesystem(StatusModel):
    mount_point: _GuestText
    type: _GuestText | None = None


class GuestOSInfo(StatusModel):
    """What qemu-guest-agent says about the running guest (KubeVirt's guestOSInfo)."""

    id: _GuestText | None = None
    name: _GuestText | None = None
    pretty_name: _GuestText | None = None
    version: _GuestText | None = None
    kernel_release: _GuestText | None = None
    hostname: _GuestText | None = None
    filesystems: list[GuestFilesystem] = Field(default_factory=list, max_length=16)


class FailoverStatus(StatusModel):
    """The last time the VM was moved off a failed node (docs/failover.md)."""

    count: int = Field(default=0, ge=0, description="Failovers of this VM so far.")
    from_node: str | None = Field(default=None, description="The failed node it left.")
    to_node: str | None = Field(default=None, description="The node it was placed on.")
    time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    policy: HighAvailability | None = None
    reason: str | None = Field(default=None, description="Why the old node counts as fenced.")
    backup_name: str | None = Field(
        default=None, description="RestoreFromBackup: the VMBackup its disks came from."
    )
    backup_time: str | None = Field(
        default=None,
        description="RestoreFromBackup: when that backup completed.",
        json_schema_extra={"format": "date-time"},
    )
    rpo_seconds: int | None = Field(
        default=None,
        ge=0,
        alias="rpoSeconds",
        description="RestoreFromBackup: the backup's age at the failover (data lost at most).",
    )


class ConsoleEndpoint(StatusModel):
    """Where ``virtfleet console`` attaches to this VM's serial console (written by the
    agent of the VM's node; the endpoint checks the caller with the apiserver)."""

    url: str = Field(description="wss:// URL of the console on the VM's node agent.")
    certificate_sha256: str = Field(
        alias="certificateSHA256",
        pattern="^[0-9a-f]{64}$",
        description="SHA-256 of the endpoint's self-signed certificate: clients pin it.",
    )


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
    guest_os_info: GuestOSInfo | None = Field(
        default=None,
        alias="guestOSInfo",
        description="From the guest agent while the VM runs and its agent is connected "
        "(condition AgentConnected).",
    )
    high_availability: HighAvailability | None = Field(
        default=None,
        description="The highAvailability policy the node's agent acts on (it self-fences "
        "HA VMs); the controller fails a VM over only by the policy its node knew.",
    )
    failover: FailoverStatus | None = Field(
        default=None,
        description="Written by the controller when it moves the VM off a failed node.",
    )
    console_endpoint: ConsoleEndpoint | None = Field(
        default=None, description="Where `virtfleet console` connects (the node agent)."
    )
    conditions: Conditions
