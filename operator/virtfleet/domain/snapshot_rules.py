"""Which elements, attributes and values a snapshot virtfleet took can hold (one table).

The union of what virtfleet's renderer writes (:mod:`virtfleet.domain.build`) and what
libvirt adds to a QEMU domain by itself (PCI/drive addresses, its own aliases, implicit
controllers, PS/2 input, ``audio type='none'``, dynamic security labels, a snapshot's
``<inactiveDomain>`` and CPU ``<cookie>``), taken from real libvirt output. Nothing here
names a host path by value: those are :class:`Kind` slots that
:mod:`virtfleet.domain.snapshot_check` compares with the VM's own domain and pools.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

__all__ = ["DOMAIN", "EMPTY", "SNAPSHOT", "Kind", "Rule", "Value"]


class Kind(StrEnum):
    """Values checked against the VM and the node rather than against a fixed set."""

    SNAPSHOT_NAME = "snapshot name"
    DOMAIN_TYPE = "domain type"
    DOMAIN_NAME = "domain name"
    UUID = "uuid"
    VOLUME = "disk source"
    BACKING = "backing image"
    IMAGE = "kernel image"
    EMULATOR = "emulator"
    SERIAL = "serial log"
    SERIAL_SOURCE = "serial source"
    LOADER = "firmware"
    NVRAM = "NVRAM"
    RNG = "RNG backend"
    PARTITION = "resource partition"
    NWFILTER = "network filter"


Value = frozenset[str] | re.Pattern[str] | Kind | None  # None: any value
#: The text rule of elements that hold none (whitespace aside).
EMPTY: Final = frozenset({""})
_NUMBER: Final = re.compile(r"[0-9]+|0x[0-9a-fA-F]+")
_ON_OFF: Final = frozenset({"on", "off"})
_IPV4: Final = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")


@dataclass(frozen=True)
class Rule:
    """An element: its allowed attributes (name → value rule), children and text rule."""

    attrs: Mapping[str, Value] = field(default_factory=dict)
    children: dict[str, Rule] = field(default_factory=dict)
    text: Value = EMPTY


def _leaf(text: Value = EMPTY, **attrs: Value) -> Rule:
    return Rule(attrs=attrs, text=text)


_ALIAS: Final = _leaf(name=None)
_ADDRESS: Final = _leaf(
    type=frozenset({"pci", "drive", "usb", "isa", "virtio-serial"}),
    domain=_NUMBER,
    bus=_NUMBER,
    slot=_NUMBER,
    function=_NUMBER,
    multifunction=_ON_OFF,
    controller=_NUMBER,
    target=_NUMBER,
    unit=_NUMBER,
    port=None,
    iobase=None,
)
_DEV: Final = {"alias": _ALIAS, "address": _ADDRESS}

_CPU: Final = Rule(
    attrs={
        "mode": frozenset({"custom", "host-model", "host-passthrough", "maximum"}),
        "match": frozenset({"exact", "minimum", "strict"}),
        "check": frozenset({"none", "partial", "full"}),
        "migratable": _ON_OFF,
    },
    children={
        "model": _leaf(None, fallback=frozenset({"allow", "forbid"})),
        "vendor": _leaf(None),
        "topology": _leaf(
            sockets=_NUMBER, dies=_NUMBER, clusters=_NUMBER, cores=_NUMBER, threads=_NUMBER
        ),
        "feature": _leaf(
            policy=frozenset({"require", "disable", "force", "optional", "forbid"}), name=None
        ),
        "maxphysaddr": _leaf(
            mode=frozenset({"passthrough", "emulate"}), bits=_NUMBER, limit=_NUMBER
        ),
    },
)

_BACKING: Final = Rule(
    attrs={"type": frozenset({"file", "block"}), "index": _NUMBER},
    children={
        "format": _leaf(type=frozenset({"qcow2", "raw"})),
        "source": _leaf(file=Kind.BACKING, dev=Kind.BACKING, index=_NUMBER),
    },
)
_BACKING.children["backingStore"] = _BACKING  # a chain: overlay → base → …

_IOTUNE: Final = Rule(
    children={
        name: _leaf(_NUMBER)
        for name in (
            "total_bytes_sec",
            "read_bytes_sec",
            "write_bytes_sec",
            "total_iops_sec",
            "read_iops_sec",
            "write_iops_sec",
        )
    }
)

_DISK: Final = Rule(
    attrs={"type": frozenset({"file", "block"}), "device": frozenset({"disk", "cdrom"})},
    children={
        "driver": _leaf(
            name=frozenset({"qemu"}),
            type=frozenset({"qcow2", "raw"}),
            cache=frozenset({"none", "directsync", "writeback", "writethrough", "default"}),
            discard=frozenset({"unmap", "ignore"}),
            io=frozenset({"native", "threads"}),
            detect_zeroes=frozenset({"off", "on", "unmap"}),
        ),
        "source": _leaf(file=Kind.VOLUME, dev=Kind.VOLUME, index=_NUMBER),
        "backingStore": _BACKING,
        "target": _leaf(
            dev=re.compile(r"(vd|sd|hd)[a-z]{1,3}"),
            bus=frozenset({"virtio", "sata", "scsi"}),
            tray=frozenset({"open", "closed"}),
        ),
        "readonly": _leaf(),
        "boot": _leaf(order=_NUMBER),
        "iotune": _IOTUNE,
        **_DEV,
    },
)

_CONTROLLER: Final = Rule(
    attrs={
        "type": frozenset({"scsi", "sata", "usb", "pci", "ide", "fdc", "virtio-serial"}),
        "index": _NUMBER,
        "model": None,
        "ports": _NUMBER,
        "vectors": _NUMBER,
    },
    children={
        "model": _leaf(name=None),
        "target": _leaf(
            chassisNr=_NUMBER,
            chassis=_NUMBER,
            port=_NUMBER,
            busNr=_NUMBER,
            index=_NUMBER,
            hotplug=_ON_OFF,
        ),
        **_DEV,
    },
)

_DIRECTION: Final = _leaf(average=_NUMBER, peak=_NUMBER, burst=_NUMBER, floor=_NUMBER)
_INTERFACE: Final = Rule(
    attrs={"type": frozenset({"user", "bridge", "network"})},
    children={
        "mac": _leaf(address=re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")),
        "source": _leaf(bridge=None, network=None, portid=None),
        "model": _leaf(type=frozenset({"virtio", "e1000", "e1000e", "rtl8139"})),
        "bandwidth": Rule(children={"inbound": _DIRECTION, "outbound": _DIRECTION}),
        # The agent's nwfilter on bridge and network NICs (DomainInputs.nwfilter): the one
        # the VM's domain has now, never a weaker one named by the stored XML.
        "filterref": Rule(
            attrs={"filter": Kind.NWFILTER},
            # A VMNetwork NIC's pinned address (the filter's IP parameter).
            children={"parameter": _leaf(name=frozenset({"IP"}), value=_IPV4)},
        ),
        # libvirt names the tap it creates vnetN (and makes a new one at each start).
        "target": _leaf(dev=re.compile(r"vnet[0-9]+")),
        # A VMNetwork NIC's MTU (its VXLAN's), what the agent writes.
        "mtu": _leaf(size=_NUMBER),
        **_DEV,
    },
)

#: Where libvirt says a running guest's pty is (snapshots of running VMs record it).
PTY_PATH: Final = re.compile(r"/dev/pts/[0-9]+")
_SERIAL: Final = Rule(
    # pty with a log file (virtfleet's now); file (domains made before the console).
    # tty: where a running guest's console pty is (libvirt writes it on <console>).
    attrs={"type": frozenset({"pty", "file"}), "tty": PTY_PATH},
    children={
        # type='file': the serial log itself; type='pty': the pty (checked in snapshot_check).
        "source": _leaf(path=Kind.SERIAL_SOURCE, append=_ON_OFF),
        "log": _leaf(file=Kind.SERIAL, append=_ON_OFF),
        "target": Rule(
            attrs={"type": frozenset({"isa-serial", "serial", "pci-serial"}), "port": _NUMBER},
            children={"model": _leaf(name=None)},
        ),
        "alias": _ALIAS,
    },
)

_DEVICES: Final = Rule(
    children={
        "emulator": _leaf(Kind.EMULATOR),
        "disk": _DISK,
        "controller": _CONTROLLER,
        "interface": _INTERFACE,
        "serial": _SERIAL,
        "console": _SERIAL,
        "input": Rule(
            attrs={
                "type": frozenset({"mouse", "keyboard", "tablet"}),
                "bus": frozenset({"ps2", "usb", "virtio"}),
            },
            children=_DEV,
        ),
        "audio": _leaf(id=_NUMBER, type=frozenset({"none"})),
        "watchdog": Rule(
            attrs={
                "model": frozenset({"itco", "i6300esb", "ib700"}),
                "action": frozenset(
                    {"reset", "shutdown", "poweroff", "pause", "none", "inject-nmi"}
                ),
            },
            children=_DEV,
        ),
        "memballoon": Rule(
            attrs={
                "model": frozenset({"virtio", "none"}),
                "autodeflate": _ON_OFF,
                "freePageReporting": _ON_OFF,
            },
            children={"stats": _leaf(period=_NUMBER), **_DEV},
        ),
        "rng": Rule(
            attrs={"model": frozenset({"virtio"})},
            children={"backend": _leaf(Kind.RNG, model=frozenset({"random"})), **_DEV},
        ),
        # The guest agent's channel only, at the socket libvirt makes for it.
        "channel": Rule(
            attrs={"type": frozenset({"unix"})},
            children={
                "source": _leaf(
                    mode=frozenset({"bind"}),
                    path=re.compile(
                        r"/var/lib/libvirt/qemu/channel/target/domain-[0-9]+-[^/]+/"
                        r"org\.qemu\.guest_agent\.0"
                    ),
                ),
                "target": _leaf(
                    type=frozenset({"virtio"}),
                    name=frozenset({"org.qemu.guest_agent.0"}),
                    state=frozenset({"connected", "disconnected"}),
                ),
                **_DEV,
            },
        ),
    }
)

_OS: Final = Rule(
    attrs={"firmware": frozenset({"efi", "bios"})},
    children={
        "type": _leaf(frozenset({"hvm"}), arch=None, machine=None),
        "kernel": _leaf(Kind.IMAGE),
        "initrd": _leaf(Kind.IMAGE),
        "cmdline": _leaf(None),
        "boot": _leaf(dev=frozenset({"hd", "cdrom", "network", "fd"})),
        "loader": _leaf(
            Kind.LOADER,
            readonly=frozenset({"yes", "no"}),
            secure=frozenset({"yes", "no"}),
            type=frozenset({"pflash", "rom"}),
            format=frozenset({"raw", "qcow2"}),
        ),
        "nvram": _leaf(
            Kind.NVRAM,
            template=Kind.LOADER,
            format=frozenset({"raw", "qcow2"}),
            templateFormat=frozenset({"raw", "qcow2"}),
        ),
        "firmware": Rule(children={"feature": _leaf(enabled=frozenset({"yes", "no"}), name=None)}),
    },
)

_FEATURE: Final = _leaf(state=_ON_OFF)
_FEATURES: Final = ("acpi", "apic", "pae", "vmport", "smm", "vmcoreinfo")
DOMAIN: Final = Rule(
    attrs={"type": Kind.DOMAIN_TYPE, "id": _NUMBER},
    children={
        "name": _leaf(Kind.DOMAIN_NAME),
        "uuid": _leaf(Kind.UUID),
        "metadata": Rule(),  # its children: _check_metadata
        "memory": _leaf(_NUMBER, unit=None),
        "currentMemory": _leaf(_NUMBER, unit=None),
        "vcpu": _leaf(_NUMBER, placement=frozenset({"static"})),
        "resource": Rule(children={"partition": _leaf(Kind.PARTITION)}),
        "os": _OS,
        "features": Rule(children=dict.fromkeys(_FEATURES, _FEATURE)),
        "cpu": _CPU,
        "clock": Rule(
            attrs={"offset": frozenset({"utc", "localtime"})},
            children={
                "timer": _leaf(
                    name=None, tickpolicy=None, present=frozenset({"yes", "no"}), track=None
                )
            },
        ),
        "on_poweroff": _leaf(frozenset({"destroy", "restart", "preserve"})),
        "on_reboot": _leaf(frozenset({"destroy", "restart", "preserve"})),
        "on_crash": _leaf(frozenset({"destroy", "restart", "preserve"})),
        "devices": _DEVICES,
        # Dynamic labels only: libvirt makes the label at start (and ignores one written
        # here); a static label or type='none' would choose QEMU's confinement.
        "seclabel": Rule(
            attrs={
                "type": frozenset({"dynamic"}),
                "model": frozenset({"apparmor", "selinux", "dac"}),
                "relabel": frozenset({"yes"}),
            },
            children={"label": _leaf(None), "imagelabel": _leaf(None)},
        ),
    },
)

SNAPSHOT: Final = Rule(
    children={
        "name": _leaf(Kind.SNAPSHOT_NAME),
        "description": _leaf(None),
        "state": _leaf(
            frozenset(
                {
                    "running",
                    "paused",
                    "shutoff",
                    "shutdown",
                    "crashed",
                    "disk-snapshot",
                    "pmsuspended",
                    "blocked",
                    "nostate",
                }
            )
        ),
        "creationTime": _leaf(_NUMBER),
        "parent": Rule(children={"name": _leaf(None)}),
        # Internal snapshots only: an external memory file or disk overlay names a host path.
        "memory": _leaf(snapshot=frozenset({"internal", "no"})),
        "disks": Rule(children={"disk": _leaf(name=None, snapshot=frozenset({"internal", "no"}))}),
        "domain": DOMAIN,
        "inactiveDomain": DOMAIN,
        # QEMU's save cookie: the guest CPU as started, and two flags (no paths).
        "cookie": Rule(
            children={
                "cpu": _CPU,
                "allowReboot": _leaf(value=frozenset({"yes", "no"})),
                "slirpHelper": _leaf(),
            }
        ),
    }
)
