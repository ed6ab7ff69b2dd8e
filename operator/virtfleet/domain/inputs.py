"""What the builder needs: the VM's identity and spec, and what the node agent resolved.

The builder never turns a user string into a host path (DESIGN §4). The agent resolves
every name (an image in the node's image store, a volume in a pool) through libvirt and
hands over finished paths here; this module checks that they are plain absolute paths
and that they match the spec one to one, so a ``DomainInputs`` that exists describes
exactly one domain.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, get_args

from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.domain.config import xml_safe
from virtfleet.domain.errors import InvalidInputError
from virtfleet.domain.ownership import (
    OwnerMetadata,
    check_name,
    check_namespace,
    check_uid,
    domain_name,
    spec_hash,
)

__all__ = [
    "BRIDGE_NAME",
    "DEFAULT_NWFILTER",
    "NWFILTER_NAME",
    "AttachedNetwork",
    "BackingKind",
    "CacheMode",
    "DiskBacking",
    "DiskFormat",
    "DomainInputs",
    "DomainType",
    "NodeResources",
]

DomainType = Literal["qemu", "kvm"]
DiskFormat = Literal["qcow2", "raw"]
BackingKind = Literal["file", "block"]
#: Only modes libvirt treats as safe for live migration of a disk that is not copied
#: (``none``/``directsync`` bypass the host page cache; see ``qemuMigrationSrcIsSafe``),
#: plus ``writeback`` for storage that cannot do O_DIRECT (tmpfs) — such domains then
#: need ``--copy-storage-all`` or ``VIR_MIGRATE_UNSAFE`` to migrate.
CacheMode = Literal["none", "directsync", "writeback"]

#: libvirt's default anti-spoofing filter: the NIC's own MAC, one IP, ARP and IPv4 only.
DEFAULT_NWFILTER: Final = "clean-traffic"
NWFILTER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
#: A Linux interface name (at most 15 characters, no "/" or whitespace).
BRIDGE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")

_DOMAIN_TYPES: Final = frozenset(get_args(DomainType))
_FORMATS: Final = frozenset(get_args(DiskFormat))
_KINDS: Final = frozenset(get_args(BackingKind))
_CACHES: Final = frozenset(get_args(CacheMode))


def check_host_path(path: str, what: str) -> str:
    """Return ``path`` if it is an absolute, normalised host path XML can carry."""
    xml_safe(path, what)
    if (
        any(c.isspace() and c != " " for c in path)  # XML normalises them in attributes
        or not path.startswith("/")
        or path.startswith("//")
        or posixpath.normpath(path) != path
        or ".." in path.split("/")
    ):
        raise InvalidInputError(f"{what} {path!r} must be an absolute, normalised path")
    return path


@dataclass(frozen=True, kw_only=True)
class DiskBacking:
    """Where one spec disk lives on this node, as resolved by the agent.

    ``cache='none'`` (the default) opens the image with O_DIRECT: writes reach storage
    at the guest's flush, and libvirt allows live migration without copying the disk
    (shared storage) only for ``none``/``directsync`` unless the caller forces
    ``VIR_MIGRATE_UNSAFE``.
    """

    path: str
    format: DiskFormat
    kind: BackingKind = "file"
    cache: CacheMode = "none"

    def __post_init__(self) -> None:
        check_host_path(self.path, "disk path")
        if self.format not in _FORMATS:
            raise InvalidInputError(f"disk format {self.format!r} is not one of {sorted(_FORMATS)}")
        if self.kind not in _KINDS:
            raise InvalidInputError(f"disk kind {self.kind!r} is not one of {sorted(_KINDS)}")
        if self.cache not in _CACHES:
            raise InvalidInputError(f"cache mode {self.cache!r} is not one of {sorted(_CACHES)}")


@dataclass(frozen=True)
class AttachedNetwork:
    """Where a ``type: network`` NIC plugs in on this node (its VMNetwork's bridge)."""

    bridge: str
    mtu: int
    #: Its IPAM address: the node's nwfilter lets the guest send from this one only.
    address: str | None = None

    def __post_init__(self) -> None:
        if not BRIDGE_NAME.fullmatch(self.bridge):
            raise InvalidInputError(f"bridge {self.bridge!r} is not a bridge name")
        if self.address is not None:
            try:
                ipaddress.IPv4Address(self.address)
            except ValueError as exc:
                raise InvalidInputError(f"{self.address!r} is not an IPv4 address") from exc
        if not 68 <= self.mtu <= 65535:
            raise InvalidInputError(f"MTU {self.mtu} is not in 68..65535")


@dataclass(frozen=True, kw_only=True)
class NodeResources:
    """Everything the agent resolved on its node for one VM (all host paths).

    ``disks`` maps spec disk names to their backing; ``kernel``/``initrd`` are the
    resolved images of ``spec.kernel``; ``cloud_init_seed`` the NoCloud ISO the agent
    wrote; ``serial_log`` the file the serial console goes to; ``emulator`` an explicit
    QEMU binary, or ``None`` for libvirt's default.
    """

    disks: Mapping[str, DiskBacking] = field(default_factory=dict)
    serial_log: str
    kernel: str | None = None
    initrd: str | None = None
    cloud_init_seed: str | None = None
    emulator: str | None = None
    #: Per ``type: network`` NIC name: the node's bridge of its VMNetwork and its MTU.
    networks: Mapping[str, AttachedNetwork] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only view: the dataclass is frozen, its mappings should be too.
        object.__setattr__(self, "disks", MappingProxyType(dict(self.disks)))
        object.__setattr__(self, "networks", MappingProxyType(dict(self.networks)))
        check_host_path(self.serial_log, "serial log path")
        for what, path in (
            ("kernel path", self.kernel),
            ("initrd path", self.initrd),
            ("cloud-init seed path", self.cloud_init_seed),
            ("emulator path", self.emulator),
        ):
            if path is not None:
                check_host_path(path, what)
        for name, backing in self.disks.items():
            if not isinstance(backing, DiskBacking):
                raise InvalidInputError(f"backing of disk {name!r} is not a DiskBacking")


@dataclass(frozen=True, kw_only=True)
class DomainInputs:
    """Identity, spec and resolved resources: the whole input of :func:`build_domain`.

    Construction fails (:class:`InvalidInputError`) when the resources do not match the spec
    one to one (a disk without backing, a kernel path without ``spec.kernel``, …): a
    half-resolved VM must never become a domain with missing devices.
    """

    namespace: str
    name: str
    uid: str
    generation: int
    spec: VirtualMachineSpec
    resources: NodeResources
    domain_type: DomainType = "qemu"
    #: Guest architecture; ``None`` lets libvirt use the host's.
    arch: str | None = None
    #: libvirt nwfilter put on bridge and network NICs (they share an L2 segment with
    #: other machines); ``None`` for none. A node setting, never the spec's.
    nwfilter: str | None = None

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_name(self.name)
        check_uid(self.uid)
        if isinstance(self.generation, bool) or self.generation < 0:
            raise InvalidInputError(
                f"generation {self.generation!r} must be a non-negative integer"
            )
        if self.domain_type not in _DOMAIN_TYPES:
            raise InvalidInputError(
                f"domain type {self.domain_type!r} is not one of {sorted(_DOMAIN_TYPES)}"
            )
        if self.arch is not None and not (self.arch.isascii() and self.arch.isidentifier()):
            raise InvalidInputError(f"arch {self.arch!r} is not an architecture name")
        if self.nwfilter is not None and not NWFILTER_NAME.fullmatch(self.nwfilter):
            raise InvalidInputError(f"nwfilter {self.nwfilter!r} is not an nwfilter name")
        self._check_resources()

    def _check_resources(self) -> None:
        spec, resources = self.spec, self.resources
        wanted = {disk.name for disk in spec.disks}
        given = set(resources.disks)
        if wanted - given:
            raise InvalidInputError(f"no backing resolved for disks {sorted(wanted - given)}")
        if given - wanted:
            raise InvalidInputError(
                f"backing given for disks not in the spec: {sorted(given - wanted)}"
            )
        _paired(spec.kernel is not None, resources.kernel, "kernel", "spec.kernel")
        _paired(
            spec.kernel is not None and spec.kernel.initrd is not None,
            resources.initrd,
            "initrd",
            "spec.kernel.initrd",
        )
        _paired(
            spec.cloud_init is not None,
            resources.cloud_init_seed,
            "cloud-init seed",
            "spec.cloudInit",
        )
        attached = {nic.name for nic in spec.interfaces if nic.type == InterfaceType.NETWORK}
        if attached != set(resources.networks):
            raise InvalidInputError(
                f"networks resolved for {sorted(resources.networks)}, but the spec attaches "
                f"{sorted(attached)}"
            )

    @property
    def domain_name(self) -> str:
        return domain_name(self.namespace, self.name)

    @property
    def owner(self) -> OwnerMetadata:
        return OwnerMetadata(
            namespace=self.namespace,
            name=self.name,
            uid=self.uid,
            generation=self.generation,
            spec_hash=spec_hash(self.spec),
        )


def _paired(wanted: bool, path: str | None, what: str, field_path: str) -> None:
    if wanted and path is None:
        raise InvalidInputError(f"{field_path} is set but no {what} path was resolved")
    if not wanted and path is not None:
        raise InvalidInputError(f"a {what} path was resolved but {field_path} is not set")
