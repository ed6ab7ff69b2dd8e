"""Desired vs observed domain → the changed fields, each marked ``live`` or ``restart``.

A pure function, so the reconciler's decisions are unit-testable. Paths use the spec's
names (``memory.size``, ``cpu.cores``, ``disks[root].iotune``); fields the agent resolves
rather than the user writes get short names of their own (``domainType``, ``serial``,
``disks[root].source``).

The classification is deliberately conservative. ``live`` means libvirt has one call
that changes the running domain *and* its persistent definition without a reboot, and
virtfleet's agent uses it:

* ``disks[x].iotune`` — ``virDomainSetBlockIoTune(LIVE|CONFIG)``;
* ``interfaces[x].bandwidth`` on bridge and network NICs —
  ``virDomainSetInterfaceParameters(LIVE|CONFIG)`` (libvirt cannot shape ``user`` NICs,
  so there it is ``restart``, which redefines it and changes nothing: see the report).

Everything else is ``restart``: the agent redefines the domain and the change takes
effect at the next boot (status ``RestartRequired``). That includes memory (ballooning
only moves the current size under a maximum that itself needs a reboot), CPU topology
and model, machine, firmware, kernel, disks and NICs added or removed (hot-plug is
possible but not worth its failure modes yet), boot order, read-only, NIC model, MAC,
source and the node's nwfilter (``interfaces[x].nwfilter``: the agent's setting, not the
spec's).

The owner marker is not compared: generation and spec hash are the reconciler's to
update (``virDomainSetMetadata``), whatever the diff says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from virtfleet.domain.config import DomainConfig
from virtfleet.domain.observe import (
    ObservedDisk,
    ObservedDomain,
    ObservedInterface,
    observe_config,
)

__all__ = ["Apply", "Change", "DomainDiff", "diff", "machine_matches"]


class Apply(StrEnum):
    """How a change reaches a running domain."""

    LIVE = "live"
    RESTART = "restart"


@dataclass(frozen=True)
class Change:
    """One field that differs: its spec path, both values and how to apply it."""

    path: str
    desired: object
    observed: object
    apply: Apply


@dataclass(frozen=True)
class DomainDiff:
    changes: tuple[Change, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)

    @property
    def live(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.apply is Apply.LIVE)

    @property
    def restart(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.apply is Apply.RESTART)

    @property
    def needs_restart(self) -> bool:
        return any(c.apply is Apply.RESTART for c in self.changes)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(c.path for c in self.changes)

    def get(self, path: str) -> Change | None:
        return next((c for c in self.changes if c.path == path), None)


#: Machine aliases and the prefix of the versioned type libvirt stores for them at
#: define time (``q35`` is kept as ``pc-q35-7.2``): the alias is not drift.
_MACHINE_PREFIXES: Final = {"pc": "pc-i440fx-", "q35": "pc-q35-"}

#: NIC types whose bandwidth libvirt can change on a running domain.
_SHAPEABLE: Final = frozenset({"bridge", "network"})


def machine_matches(desired: str | None, observed: str | None) -> bool:
    """``desired`` (``None`` = hypervisor default) is satisfied by ``observed``."""
    if desired is None or desired == observed:
        return True
    if observed is None:
        return False
    prefix = _MACHINE_PREFIXES.get(desired, f"{desired}-")
    return observed.startswith(prefix)


def diff(desired: DomainConfig | ObservedDomain, observed: ObservedDomain) -> DomainDiff:
    """What must change for ``observed`` to be ``desired``; empty when nothing does."""
    want = observe_config(desired) if isinstance(desired, DomainConfig) else desired
    return DomainDiff(tuple(_changes(want, observed)))


def _changes(want: ObservedDomain, have: ObservedDomain) -> Iterator[Change]:
    restart = Apply.RESTART

    def field(
        path: str, desired: object, observed: object, apply: Apply = restart
    ) -> Iterator[Change]:
        if desired != observed:
            yield Change(path, desired, observed, apply)

    yield from field("domainType", want.virt_type, have.virt_type)
    yield from field("memory.size", want.memory_bytes, have.memory_bytes)
    yield from field("cpu.sockets", want.sockets, have.sockets)
    yield from field("cpu.cores", want.cores, have.cores)
    yield from field("cpu.threads", want.threads, have.threads)
    if (want.sockets, want.cores, want.threads) == (have.sockets, have.cores, have.threads):
        yield from field("cpu.vcpus", want.vcpus, have.vcpus)
    if want.cpu_model is not None:  # unset: whatever model the hypervisor filled in
        yield from field("cpu.model", want.cpu_model, have.cpu_model)
    if not machine_matches(want.machine, have.machine):
        yield Change("machine", want.machine, have.machine, restart)
    yield from field("firmware.type", want.firmware, have.firmware)
    yield from field("kernel.image", want.kernel, have.kernel)
    yield from field("kernel.initrd", want.initrd, have.initrd)
    yield from field("kernel.cmdline", want.cmdline, have.cmdline)
    yield from field("cloudInit", want.cloud_init_seed, have.cloud_init_seed)
    yield from _disk_changes(want.disks, have.disks)
    yield from _interface_changes(want.interfaces, have.interfaces)
    yield from field("serial", want.serial_path, have.serial_path)
    # A domain from before the console has a file serial: redefined as a pty (a restart
    # brings the console), like any other change.
    yield from field("serial.type", want.serial_type, have.serial_type)
    yield from field("devices", want.extra_devices, have.extra_devices)


def _disk_changes(
    wanted: tuple[ObservedDisk, ...], present: tuple[ObservedDisk, ...]
) -> Iterator[Change]:
    restart = Apply.RESTART
    by_name = {d.name: d for d in present if d.name is not None}
    for want in wanted:
        base = f"disks[{want.name}]"
        have = by_name.pop(want.name, None) if want.name is not None else None
        if have is None:
            yield Change(base, want.path, None, restart)
            continue
        if want.bus != have.bus:
            yield Change(f"{base}.bus", want.bus, have.bus, restart)
        elif want.target != have.target:  # same bus, other position: the disk order moved
            yield Change(f"{base}.target", want.target, have.target, restart)
        source = (want.device, want.kind, want.path, want.format)
        seen = (have.device, have.kind, have.path, have.format)
        if source != seen:
            yield Change(f"{base}.source", source, seen, restart)
        if want.readonly != have.readonly:
            yield Change(f"{base}.readOnly", want.readonly, have.readonly, restart)
        if want.boot_order != have.boot_order:
            yield Change(f"{base}.bootOrder", want.boot_order, have.boot_order, restart)
        if want.iotune != have.iotune:
            yield Change(f"{base}.iotune", want.iotune, have.iotune, Apply.LIVE)
    for name, extra in by_name.items():
        yield Change(f"disks[{name}]", None, extra.path, restart)
    for foreign in present:
        if foreign.name is None:
            # '=' cannot occur in a disk name (a DNS label), so this path never collides.
            yield Change(f"disks[target={foreign.target}]", None, foreign.path, restart)


def _interface_changes(
    wanted: tuple[ObservedInterface, ...], present: tuple[ObservedInterface, ...]
) -> Iterator[Change]:
    restart = Apply.RESTART
    by_name = {i.name: i for i in present if i.name is not None}
    for want in wanted:
        base = f"interfaces[{want.name}]"
        have = by_name.pop(want.name, None) if want.name is not None else None
        if have is None:
            yield Change(base, want.mac, None, restart)
            continue
        if want.type != have.type:
            yield Change(f"{base}.type", want.type, have.type, restart)
        elif want.source != have.source:
            yield Change(f"{base}.{want.type}", want.source, have.source, restart)
        if want.model != have.model:
            yield Change(f"{base}.model", want.model, have.model, restart)
        if want.mac != have.mac:
            yield Change(f"{base}.macAddress", want.mac, have.mac, restart)
        if want.nwfilter != have.nwfilter:
            yield Change(f"{base}.nwfilter", want.nwfilter, have.nwfilter, restart)
        if want.bandwidth != have.bandwidth:
            live = want.type in _SHAPEABLE and have.type == want.type
            apply = Apply.LIVE if live else restart
            yield Change(f"{base}.bandwidth", want.bandwidth, have.bandwidth, apply)
    for name, extra in by_name.items():
        yield Change(f"interfaces[{name}]", None, extra.mac, restart)
    for foreign in present:
        if foreign.name is None:
            yield Change(f"interfaces[mac={foreign.mac}]", None, foreign.mac, restart)
