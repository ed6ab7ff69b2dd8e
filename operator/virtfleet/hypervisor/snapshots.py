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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from virtfleet.hypervisor import backup, errors
from virtfleet.hypervisor.guest import Guest
from virtfleet.hypervisor.names import validate_name
from virtfleet.identity import RESTORE_MARKER_NAMESPACE

__all__ = [
    "RESTORE_MARKER_NAMESPACE",
    "SnapshotCheck",
    "SnapshotInfo",
    "barrier",
    "create_snapshot",
    "current",
    "delete",
    "disk_plan",
    "export",
    "get",
    "list_snapshots",
    "parse_snapshot",
    "redefine",
    "restore_marker",
    "revert",
    "set_restore_marker",
    "snapshot_xml",
]

_RESTORE_MARKER_KEY = "virtfleet-restore"
#: A metadata namespace nobody writes: removing its (absent) element is a no-op that
#: still needs the domain's modify job, which makes it a barrier (see :func:`barrier`).
_BARRIER_NAMESPACE = "https://virtfleet.io/xmlns/barrier/v1"


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
    name: str,
    *,
    include_memory: bool,
    disk_only: bool = False,
    description: str | None = None,
    disks: Mapping[str, str] | None = None,
) -> str:
    """``<domainsnapshot>`` for :func:`create_snapshot`.

    Memory is ``internal`` (in the qcow2 image, next to the disk state) or ``no``;
    a disk-only snapshot never has memory. ``disks`` maps a disk's target (``vda``) to
    ``internal`` or ``no`` (see :func:`disk_plan`); unset leaves the choice to libvirt.
    """
    validate_name(name, "snapshot name")
    if disk_only and include_memory:
        raise ValueError("a disk-only snapshot cannot include memory")
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = name
    if description:
        etree.SubElement(root, "description").text = description
    etree.SubElement(root, "memory", snapshot="internal" if include_memory else "no")
    if disks:
        element = etree.SubElement(root, "disks")
        for target, how in disks.items():
            if how not in ("internal", "external", "no"):
                raise ValueError(f"disk {target!r}: snapshot must be internal, external or no")
            etree.SubElement(element, "disk", name=target, snapshot=how)
    return etree.tostring(root, encoding="unicode")


def disk_plan(domain_xml: str) -> dict[str, str]:
    """Which of a domain's disks an internal snapshot covers: target → ``internal``/``no``.

    Only writable qcow2 images can hold an internal snapshot. Read-only media (the raw
    cloud-init seed disk), empty drives and other formats are excluded explicitly with
    ``no``: libvirt's own defaults differ between versions, and a raw disk left in the
    set makes the whole snapshot fail. The qcow2 disks are snapshotted together, so the
    snapshot holds all of them or none.
    """
    root = etree.fromstring(domain_xml.encode())
    plan: dict[str, str] = {}
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        writable = disk.find("readonly") is None and disk.get("device", "disk") == "disk"
        has_source = disk.find("source") is not None
        ok = writable and has_source and fmt == "qcow2"
        plan[str(target.get("dev"))] = "internal" if ok else "no"
    return plan


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
    disks: Mapping[str, str] | None = None,
) -> SnapshotInfo:
    """Take snapshot ``name``.

    ``include_memory``: also save RAM/device state (a running guest resumes exactly
    there on revert). ``disk_only``: external disk snapshot without memory (qcow2
    overlays; ``ATOMIC`` so all disks or none). ``quiesce``: freeze guest file systems via
    the guest agent first (fails if there is no agent). ``description`` is free text;
    upper layers may store structured data there, it survives export/redefine.
    ``disks``: per-target choice (:func:`disk_plan`).
    """
    xml = snapshot_xml(
        name,
        include_memory=include_memory,
        disk_only=disk_only,
        description=description,
        disks=disks,
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

    # A dirty bitmap makes QEMU refuse the revert and leaves the domain shut off.
    await backup.drop_checkpoints(guest)
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


#: Raises unless a snapshot XML may be redefined on a domain whose current XMLs (live and
#: persistent) are given: ``functools.partial(domain.snapshot_check.check_snapshot_xml, …)``.
SnapshotCheck = Callable[[str, Sequence[str]], None]


async def redefine(
    guest: Guest, xml: str, *, check: SnapshotCheck, make_current: bool = False
) -> SnapshotInfo:
    """Re-create a snapshot's metadata from :func:`export` output; the data must exist.

    A revert replaces the domain with the ``<domain>`` inside ``xml``, which came back from
    storage (status): ``check`` sees it with the domain's definition as it is now, in the
    same worker call, and whatever it raises stops the redefine. ``make_current`` marks it
    current again (``REDEFINE_CURRENT``).
    """
    validate_name(parse_snapshot(xml).name, "snapshot name")
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    if make_current:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT

    def call() -> SnapshotInfo:
        references = [str(guest.handle.XMLDesc(0))]
        if guest.handle.isPersistent():
            references.append(str(guest.handle.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        check(xml, references)
        return _info(guest.handle.snapshotCreateXML(xml, flags))

    return await guest.executors.run(call)


async def set_restore_marker(guest: Guest, token: str) -> None:
    """Write ``token`` into the domain's ``<metadata>`` (live and persistent definition).

    A revert replaces the domain's definition with the one saved in the snapshot, which
    cannot hold a token written after the snapshot was taken: the marker disappears
    exactly when a revert happens. That is how a restorer that was killed mid-way tells
    "not reverted yet" (marker still there) from "already reverted" (marker gone)
    without reverting twice.
    """
    validate_name(token, "restore marker")
    element = etree.Element("restore", id=token)
    xml = etree.tostring(element, encoding="unicode")

    def call() -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if guest.handle.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        guest.handle.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            xml,
            _RESTORE_MARKER_KEY,
            RESTORE_MARKER_NAMESPACE,
            flags,
        )

    await guest.executors.run(call)


async def restore_marker(guest: Guest) -> str | None:
    """The token of :func:`set_restore_marker` on the domain as it is now, or ``None``."""
    text = await guest.metadata(RESTORE_MARKER_NAMESPACE)
    if text is None:
        return None
    try:
        return etree.fromstring(text.encode()).get("id")
    except etree.XMLSyntaxError:
        return None


async def barrier(guest: Guest) -> None:
    """Return once no other client's job (a revert, a snapshot) runs on the domain.

    A revert or snapshot started by a process that has since died keeps running in
    libvirtd, and its job type reads ``none`` while it does, so polling cannot see it.
    Removing an absent metadata element changes nothing but needs the domain's modify
    job, which libvirt only grants after such a job ended. Drivers without metadata
    support have no concurrent jobs to wait for.
    """

    def call() -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if guest.handle.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        guest.handle.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, _BARRIER_NAMESPACE, flags
        )

    try:
        await guest.executors.run_long(call)
    except (errors.Unsupported, errors.NotFound):
        return
