"""Domain snapshots: create, list, revert, delete, and redefine after a libvirtd loss.

Snapshot XML is built with lxml, never templated, and names are checked like volume names
(they become qcow2 tags or external file names). Creating, reverting and deleting run in
the long-job pool: on QEMU they pause the guest and write memory to disk.

libvirt keeps snapshot *metadata* outside the disks. If it is lost (a re-installed node,
a migration, which libvirt refuses while snapshots exist, DESIGN §5) the data is still in
the qcow2 files, and :func:`export` + :func:`redefine` (``SNAPSHOT_CREATE_REDEFINE``) bring
the metadata back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from virtfleet.hypervisor import errors
from virtfleet.hypervisor.guest import Guest
from virtfleet.hypervisor.names import validate_name

__all__ = [
    "SnapshotInfo",
    "create_snapshot",
    "current",
    "delete",
    "export",
    "get",
    "list_snapshots",
    "parse_snapshot",
    "redefine",
    "revert",
    "snapshot_xml",
]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot as plain values.

    ``state`` is the domain state it captured (``running``, ``shutoff``,
    ``disk-snapshot``...); ``creation_time`` is Unix seconds.
    """

    name: str
    state: str
    creation_time: int
    description: str | None
    parent: str | None
    has_memory: bool
    disk_only: bool
    current: bool


def snapshot_xml(
    name: str, *, include_memory: bool, disk_only: bool = False, description: str | None = None
) -> str:
    """``<domainsnapshot>`` for :func:`create_snapshot`.

    Memory is ``internal`` (in the qcow2 image, next to the disk state) or ``no``;
    a disk-only snapshot never has memory.
    """
    validate_name(name, "snapshot name")
    if disk_only and include_memory:
        raise ValueError("a disk-only snapshot cannot include memory")
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = name
    if description:
        etree.SubElement(root, "description").text = description
    etree.SubElement(root, "memory", snapshot="internal" if include_memory else "no")
    return etree.tostring(root, encoding="unicode")


def parse_snapshot(xml: str, *, current: bool = False) -> SnapshotInfo:
    """A snapshot's XML (``getXMLDesc``) as :class:`SnapshotInfo`."""
    root = etree.fromstring(xml.encode())
    memory = root.find("memory")
    state = root.findtext("state") or "nostate"
    return SnapshotInfo(
        name=root.findtext("name") or "",
        state=state,
        creation_time=int(root.findtext("creationTime") or 0),
        description=root.findtext("description"),
        parent=root.findtext("parent/name"),
        has_memory=memory is not None and memory.get("snapshot") in ("internal", "external"),
        disk_only=state == "disk-snapshot",
        current=current,
    )


def _info(snap: Any) -> SnapshotInfo:
    """Worker thread: a ``virDomainSnapshot`` as :class:`SnapshotInfo`."""
    return parse_snapshot(str(snap.getXMLDesc(0)), current=bool(snap.isCurrent(0)))


def _lookup(guest: Guest, name: str) -> Any:
    return guest.handle.snapshotLookupByName(validate_name(name, "snapshot name"), 0)


async def create_snapshot(
    guest: Guest,
    name: str,
    *,
    include_memory: bool,
    disk_only: bool = False,
    quiesce: bool = False,
    description: str | None = None,
) -> SnapshotInfo:
    """Take snapshot ``name``.

    ``include_memory``: also save RAM/device state (a running guest resumes exactly
    there on revert). ``disk_only``: external disk snapshot without memory (qcow2
    overlays; ``ATOMIC`` so all disks or none). ``quiesce``: freeze guest file systems via
    the guest agent first (fails if there is no agent). ``description`` is free text;
    upper layers may store structured data there, it survives export/redefine.
    """
    xml = snapshot_xml(
        name, include_memory=include_memory, disk_only=disk_only, description=description
    )
    flags = 0
    if disk_only:
        flags |= (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
    if quiesce:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE

    def call() -> SnapshotInfo:
        return _info(guest.handle.snapshotCreateXML(xml, flags))

    return await guest.executors.run_long(call)


async def list_snapshots(guest: Guest) -> list[SnapshotInfo]:
    """All snapshots of ``guest``, oldest first (ties by name)."""

    def call() -> list[SnapshotInfo]:
        return [_info(snap) for snap in guest.handle.listAllSnapshots(0)]

    snaps = await guest.executors.run(call)
    return sorted(snaps, key=lambda s: (s.creation_time, s.name))


async def get(guest: Guest, name: str) -> SnapshotInfo | None:
    """Snapshot ``name`` or ``None``."""
    try:
        return await guest.executors.run(lambda: _info(_lookup(guest, name)))
    except errors.NotFound:
        return None


async def current(guest: Guest) -> SnapshotInfo | None:
    """The current snapshot (the one the guest was last reverted to or took), or ``None``."""

    def call() -> SnapshotInfo | None:
        if not guest.handle.hasCurrentSnapshot(0):
            return None
        return _info(guest.handle.snapshotCurrent(0))

    try:
        return await guest.executors.run(call)
    except errors.NotFound:
        return None


async def export(guest: Guest, name: str) -> str:
    """Snapshot ``name``'s full XML (with the domain definition), for :func:`redefine`.

    Without ``SECURE``: secrets stay out of whatever stores the export.
    """
    return await guest.executors.run(lambda: str(_lookup(guest, name).getXMLDesc(0)))


async def revert(guest: Guest, name: str, *, running: bool | None = None) -> None:
    """Bring ``guest`` back to snapshot ``name``.

    ``running``: ``None`` restores the state the snapshot captured, ``True`` forces the
    guest running afterwards, ``False`` leaves it paused (libvirt has no "revert to off"
    for a snapshot of a running guest).
    """
    flags = 0
    if running is True:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
    elif running is False:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED

    await guest.executors.run_long(
        lambda: guest.handle.revertToSnapshot(_lookup(guest, name), flags)
    )


async def delete(guest: Guest, name: str, *, metadata_only: bool = False) -> bool:
    """Delete snapshot ``name``; ``False`` if it did not exist.

    ``metadata_only`` forgets libvirt's record but keeps the data in the disks (before a
    migration; re-create it with :func:`redefine`). Raises :class:`Unsupported` where the
    driver cannot do that, never falls back to deleting the data.
    """
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if metadata_only else 0

    def call() -> bool:
        try:
            snap = _lookup(guest, name)
        except libvirt.libvirtError as exc:
            if isinstance(errors.translate(exc), errors.NotFound):
                return False
            raise
        snap.delete(flags)
        return True

    return await guest.executors.run_long(call)


async def redefine(guest: Guest, xml: str, *, make_current: bool = False) -> SnapshotInfo:
    """Re-create a snapshot's metadata from :func:`export` output; the data must exist.

    ``make_current`` marks it current again (``REDEFINE_CURRENT``).
    """
    validate_name(parse_snapshot(xml).name, "snapshot name")
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    if make_current:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    return await guest.executors.run(lambda: _info(guest.handle.snapshotCreateXML(xml, flags)))
