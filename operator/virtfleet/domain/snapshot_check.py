"""Could virtfleet have taken this snapshot XML of this VM on this node? Refuse it if not.

``VMSnapshot.status.snapshotXML`` is redefined into libvirt when libvirt lost a snapshot's
metadata (``SNAPSHOT_CREATE_REDEFINE``), and a revert then *replaces the domain* with the
``<domain>`` inside it. Status is only as trustworthy as whoever can write it, so before a
redefine the document is held to what virtfleet renders and libvirt adds to it
(docs/security.md#stored-snapshot-xml):

* one table (``DOMAIN``) names every element and attribute allowed: virtfleet's renderer
  (:mod:`virtfleet.domain.build`) plus libvirt's own additions (addresses, aliases,
  implicit controllers and input devices, dynamic security labels). Anything else —
  ``<hostdev>``, ``<filesystem>``, ``qemu:commandline`` or any other namespace, an
  interface script, a static security label, an external memory file — is refused;
* the domain is this VM's: name, UUID and virtfleet's owner marker name it;
* every host path is one virtfleet gives this VM: disks are this VM's volumes
  (``<pool dir>/<uid>-…``) in the node's disk pools, kernels and backing images come from
  the image store, and the emulator, serial log, firmware and RNG paths are those of the
  domain as libvirt holds it now (``references``: the VM's current live and persistent XML,
  which virtfleet defined and keeps free of drift);
* memory does not exceed what the VM has now (its placement was counted for that).

Pure: strings in, :class:`UnsafeSnapshotError` out.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from lxml import etree

from virtfleet.domain.config import DomainConfig, parse_xml
from virtfleet.domain.errors import DomainError
from virtfleet.domain.ownership import OWNER_TAG, domain_name, find_owner
from virtfleet.domain.snapshot_rules import DOMAIN, EMPTY, PTY_PATH, SNAPSHOT, Kind, Rule, Value
from virtfleet.identity import RESTORE_MARKER_NAMESPACE

__all__ = ["SnapshotBounds", "UnsafeSnapshotError", "check_snapshot_xml"]

_RESTORE_TAG: Final = f"{{{RESTORE_MARKER_NAMESPACE}}}restore"


class UnsafeSnapshotError(DomainError):
    """A snapshot XML that is not one virtfleet took of this VM: never redefined."""


@dataclass(frozen=True, kw_only=True)
class SnapshotBounds:
    """Whose snapshot it must be, and the node's directories its disks may live in."""

    namespace: str
    name: str
    uid: str
    #: The libvirt snapshot name the redefine is for (``vf-<VMSnapshot uid>``).
    snapshot_name: str
    #: Directories of the node's disk pools (disks: this VM's volumes there).
    volume_dirs: tuple[str, ...] = ()
    #: Directories of the image store (kernels, initrds, backing images).
    image_dirs: tuple[str, ...] = ()


def check_snapshot_xml(xml: str, references: Sequence[str], bounds: SnapshotBounds) -> None:
    """Raise :class:`UnsafeSnapshotError` unless ``xml`` may be redefined (module doc).

    ``references``: the VM's domain XML as libvirt holds it now (live and persistent).
    """
    if not references:
        raise UnsafeSnapshotError("the VM's domain is not defined: nothing to compare with")
    try:
        root = parse_xml(xml)
        refs = [parse_xml(reference) for reference in references]
    except DomainError as exc:
        raise UnsafeSnapshotError(f"snapshot XML: {exc}") from exc
    if root.tag != "domainsnapshot" or root.attrib:
        raise UnsafeSnapshotError("snapshot XML: the root must be a plain <domainsnapshot>")
    known: dict[Kind, set[str]] = {kind: set() for kind in Kind}
    for ref in refs:
        _collect(ref, DOMAIN, known)
    check = _Checker(bounds, known)
    check.element(root, SNAPSHOT, "domainsnapshot")
    if root.find("domain") is None:
        raise UnsafeSnapshotError("snapshot XML: it has no <domain>")
    limit = max((_memory(ref) for ref in refs), default=0)
    for tag in ("domain", "inactiveDomain"):
        for element in root.findall(tag):
            check.metadata(element, tag)
            if _memory(element) > limit:
                raise UnsafeSnapshotError(
                    f"{tag}: more memory than the VM has now ({limit} KiB); it was placed for that"
                )


def _memory(element: etree._Element) -> int:
    """The larger of ``<memory>`` and ``<currentMemory>`` in KiB, read like every domain."""
    domain = copy.deepcopy(element)
    domain.tag = "domain"
    try:
        config = DomainConfig.parse(domain)
    except DomainError as exc:
        raise UnsafeSnapshotError(f"{element.tag}: {exc}") from exc
    return max(config.memory_kib, config.current_memory_kib or 0)


def _collect(element: etree._Element, rule: Rule, known: dict[Kind, set[str]]) -> None:
    """Record the values of a trusted reference domain, by kind (unknown parts skipped)."""
    for attribute, value in element.attrib.items():
        kind = rule.attrs.get(str(attribute))
        if isinstance(kind, Kind):
            known[kind].add(str(value))
    if isinstance(rule.text, Kind) and element.text:
        known[rule.text].add(element.text)
    for child in element:
        sub = rule.children.get(str(child.tag)) if isinstance(child.tag, str) else None
        if sub is not None:
            _collect(child, sub, known)


class _Checker:
    def __init__(self, bounds: SnapshotBounds, known: Mapping[Kind, set[str]]) -> None:
        self.bounds = bounds
        self.known = known

    def element(self, element: etree._Element, rule: Rule, where: str) -> None:
        for attribute, value in element.attrib.items():
            name = str(attribute)
            if name not in rule.attrs:
                raise UnsafeSnapshotError(
                    f"{where}: attribute {_pretty(name)!r} is not virtfleet's"
                )
            self.value(rule.attrs[name], str(value), f"{where}/@{name}")
        text = element.text or ""
        self.value(rule.text, text.strip() if rule.text is EMPTY else text, where)
        for child in element:
            if not isinstance(child.tag, str):
                continue  # a comment or processing instruction: nothing libvirt reads
            tag = str(child.tag)
            sub = rule.children.get(tag)
            if sub is None:
                raise UnsafeSnapshotError(
                    f"{where}: element <{_pretty(tag)}> is not something virtfleet renders"
                )
            if tag != "metadata" or rule is not DOMAIN:
                self.element(child, sub, f"{where}/{tag}")
            if tag in ("serial", "console"):
                _chardev(child, f"{where}/{tag}")

    def value(self, rule: Value, value: str, where: str) -> None:
        if rule is None:
            return
        if rule is EMPTY and value:
            raise UnsafeSnapshotError(f"{where}: unexpected text {value[:40]!r}")
        if isinstance(rule, frozenset):
            if value not in rule:
                raise UnsafeSnapshotError(f"{where}: {value[:80]!r} is not one of {sorted(rule)}")
            return
        if isinstance(rule, re.Pattern):
            if not rule.fullmatch(value):
                raise UnsafeSnapshotError(f"{where}: {value[:80]!r} is not allowed")
            return
        if not self.allowed(rule, value):
            raise UnsafeSnapshotError(
                f"{where}: {rule.value} {value[:200]!r} is not this VM's on this node"
            )

    def allowed(self, kind: Kind, value: str) -> bool:
        bounds = self.bounds
        match kind:
            case Kind.SNAPSHOT_NAME:
                return value == bounds.snapshot_name
            case Kind.DOMAIN_NAME:
                return value == domain_name(bounds.namespace, bounds.name)
            case Kind.UUID:
                return value.strip().lower() == bounds.uid
            case Kind.PARTITION:
                return value in self.known[kind] or value == "/machine"
            case Kind.SERIAL | Kind.SERIAL_SOURCE:
                # The VM's log: a <log file> now, a file serial's <source> before. A pty's
                # path is where libvirt put it at that run (only ever a pty's source).
                pty = bool(PTY_PATH.fullmatch(value))
                logs = self.known[Kind.SERIAL] | self.known[Kind.SERIAL_SOURCE]
                return (kind is Kind.SERIAL_SOURCE and pty) or (not pty and value in logs)
        if value in self.known[kind]:
            return True
        if kind in (Kind.VOLUME, Kind.BACKING) and _in(value, bounds.volume_dirs):
            return posixpath.basename(value).startswith(f"{bounds.uid}-")
        if kind in (Kind.BACKING, Kind.IMAGE):
            return _in(value, bounds.image_dirs)
        return False

    def metadata(self, domain: etree._Element, where: str) -> None:
        """Only virtfleet's owner marker for this VM (and a restore marker) in <metadata>."""
        metadata = domain.find("metadata")
        if metadata is None:
            raise UnsafeSnapshotError(f"{where}: no virtfleet owner marker")
        if metadata.attrib or (metadata.text or "").strip():
            raise UnsafeSnapshotError(f"{where}/metadata: unexpected attributes or text")
        for child in metadata:
            if isinstance(child.tag, str) and child.tag not in (OWNER_TAG, _RESTORE_TAG):
                raise UnsafeSnapshotError(
                    f"{where}/metadata: <{_pretty(str(child.tag))}> is not virtfleet's"
                )
            if child.tag == _RESTORE_TAG and (set(child.attrib) - {"id"} or len(child)):
                raise UnsafeSnapshotError(f"{where}/metadata: the restore marker has extra content")
        try:
            owner = find_owner(metadata)
        except DomainError as exc:
            raise UnsafeSnapshotError(f"{where}/metadata: {exc}") from exc
        bounds = self.bounds
        if owner is None or (owner.namespace, owner.name, owner.uid) != (
            bounds.namespace,
            bounds.name,
            bounds.uid,
        ):
            raise UnsafeSnapshotError(f"{where}: no virtfleet owner marker of this VM")


def _chardev(element: etree._Element, where: str) -> None:
    """A file serial writes only to its log; a pty's source is only a pty."""
    source = element.find("source")
    path = source.get("path", "") if source is not None else ""
    is_pty = bool(PTY_PATH.fullmatch(path))
    if path and is_pty != (element.get("type") == "pty"):
        raise UnsafeSnapshotError(f"{where}/source/@path: {path[:80]!r} does not fit its type")
    if element.get("tty") is not None and element.get("type") != "pty":
        raise UnsafeSnapshotError(f"{where}/@tty: only a pty has one")


def _in(path: str, directories: Sequence[str]) -> bool:
    """``path`` is a file directly in one of ``directories`` (normalised, no ``..``)."""
    if not path.startswith("/") or posixpath.normpath(path) != path or "\x00" in path:
        return False
    parent = posixpath.dirname(path)
    return any(parent == posixpath.normpath(directory) for directory in directories)


def _pretty(tag: str) -> str:
    """A tag for a message: ``commandline in namespace http://libvirt.org/…/qemu/1.0``."""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return f"{local} in namespace {namespace}"
    return tag
