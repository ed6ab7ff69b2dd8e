"""Who a domain belongs to: the versioned owner marker, the domain name, the spec hash.

The marker is the only thing that makes a libvirt domain *ours* (DESIGN §3.3): a domain
without it is never touched, whatever its name. It lives in ``<metadata>`` in the
project's own XML namespace, so libvirt keeps it verbatim across define, migration and
snapshots, and the agent can rewrite it alone with ``virDomainSetMetadata`` (see
:meth:`OwnerMetadata.to_string`) when only the generation moved.

``version`` is an integer attribute on top of the namespace's ``/v1``: a reader that meets
a version it does not know refuses to interpret the marker (and so must not delete or
redefine the domain) instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Final, Self

from lxml import etree

from virtfleet.api.base import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain.config.base import parse_xml
from virtfleet.domain.errors import DomainError, InvalidInputError, MalformedDomainError
from virtfleet.identity import METADATA_ELEMENT, METADATA_NAMESPACE, METADATA_PREFIX

__all__ = [
    "MAX_DOMAIN_NAME_LENGTH",
    "OWNER_TAG",
    "OWNER_VERSION",
    "OwnerMetadata",
    "domain_name",
    "find_owner",
    "spec_hash",
]

#: The marker version this code writes and the only one it reads.
OWNER_VERSION: Final = 1
#: Clark notation of the marker element, for lxml lookups.
OWNER_TAG: Final = f"{{{METADATA_NAMESPACE}}}{METADATA_ELEMENT}"

#: libvirt names files after the domain (``/etc/libvirt/qemu/<name>.xml``, its log,
#: snapshot and NVRAM files) and node agents name volumes ``<domain>-<disk>.qcow2``;
#: NAME_MAX is 255 bytes. 128 leaves room for a 63-character disk name and any suffix.
MAX_DOMAIN_NAME_LENGTH: Final = 128

_NAMESPACE_RE = re.compile(DNS_LABEL_PATTERN)
_NAME_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")

#: Spec fields that never reach the domain definition (scheduling and lifecycle policy):
#: changing them must not make the agent think the domain is out of date.
_NOT_IN_DOMAIN: Final = frozenset(
    {"runStrategy", "nodeName", "nodeSelector", "evictionStrategy", "terminationGracePeriodSeconds"}
)


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is a Kubernetes namespace name (a DNS label)."""
    if len(namespace) > 63 or not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidInputError(f"namespace {namespace!r} is not a DNS label")
    return namespace


def check_name(name: str) -> str:
    """Return ``name`` if it is a Kubernetes object name (a DNS subdomain)."""
    if len(name) > 253 or not _NAME_RE.fullmatch(name):
        raise InvalidInputError(f"name {name!r} is not a DNS subdomain")
    return name


def check_uid(uid: str) -> str:
    """Return ``uid`` if it is a canonical (lowercase, hyphenated) UUID, as Kubernetes writes it.

    Canonical only, because it becomes the domain UUID and libvirt reports UUIDs in
    this form: any other spelling would compare unequal on the way back.
    """
    try:
        parsed = uuid.UUID(uid)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidInputError(f"uid {uid!r} is not a UUID") from exc
    if str(parsed) != uid:
        raise InvalidInputError(f"uid {uid!r} is not a canonical lowercase UUID")
    return uid


def domain_name(namespace: str, name: str) -> str:
    """The libvirt domain name of VM ``namespace/name``: ``<namespace>_<name>``.

    ``_`` is illegal in both namespaces and object names, so the name is unambiguous and
    cannot collide with another VM's. Names longer than :data:`MAX_DOMAIN_NAME_LENGTH`
    are cut and get ``_<12 hex digits of sha256(namespace/name)>`` appended: the second
    ``_`` marks the shortened form, which therefore never equals a plain one. Identity
    never depends on the name (UUID = uid, and the owner marker); it is for humans and
    ``virsh``.
    """
    check_namespace(namespace)
    check_name(name)
    plain = f"{namespace}_{name}"
    if len(plain) <= MAX_DOMAIN_NAME_LENGTH:
        return plain
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:12]
    keep = MAX_DOMAIN_NAME_LENGTH - len(namespace) - 1 - 1 - len(digest)
    return f"{namespace}_{name[:keep]}_{digest}"


def spec_hash(spec: VirtualMachineSpec) -> str:
    """SHA-256 (hex) of the part of ``spec`` that shapes the domain, in canonical JSON.

    Stored in the marker so the reconciler can tell cheaply "this domain was built
    from the spec as it is now"; when the hash differs, :func:`virtfleet.domain.diff`
    decides what changed and how to apply it. Scheduling and lifecycle fields
    (``runStrategy``, ``nodeSelector``, …) are left out on purpose; cloud-init is kept,
    since a change there means a new seed disk even though the XML looks the same.
    Quantities hash by their text (``1Gi`` and ``1024Mi`` differ): a false "changed"
    only costs a diff that comes out empty.
    """
    wire = {k: v for k, v in spec.to_wire().items() if k not in _NOT_IN_DOMAIN}
    canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class OwnerMetadata:
    """``<virtfleet:owner version namespace name uid generation specHash/>``.

    ``generation`` is the VM's ``metadata.generation`` the domain was last reconciled
    to and ``spec_hash`` the :func:`spec_hash` of that spec. Every field is checked on
    construction, so a marker that parses is one the agent could have written.
    """

    namespace: str
    name: str
    uid: str
    generation: int
    spec_hash: str
    version: int = OWNER_VERSION

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_name(self.name)
        check_uid(self.uid)
        if isinstance(self.generation, bool) or self.generation < 0:
            raise InvalidInputError(
                f"generation {self.generation!r} must be a non-negative integer"
            )
        if not _HASH_RE.fullmatch(self.spec_hash):
            raise InvalidInputError(f"specHash {self.spec_hash!r} is not a lowercase sha256 hex")
        if self.version != OWNER_VERSION:
            raise InvalidInputError(f"owner marker version {self.version} is not {OWNER_VERSION}")

    def to_xml(self) -> etree._Element:
        element = etree.Element(OWNER_TAG, nsmap={METADATA_PREFIX: METADATA_NAMESPACE})
        element.set("version", str(self.version))
        element.set("namespace", self.namespace)
        element.set("name", self.name)
        element.set("uid", self.uid)
        element.set("generation", str(self.generation))
        element.set("specHash", self.spec_hash)
        return element

    def to_string(self) -> str:
        """The marker alone, for ``virDomainSetMetadata(ELEMENT, xml, 'virtfleet', NS)``."""
        return etree.tostring(self.to_xml(), encoding="unicode")

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        """Read a marker; :class:`MalformedDomainError` when it is not one we can trust."""
        if element.tag != OWNER_TAG:
            raise MalformedDomainError(f"expected {OWNER_TAG}, found {element.tag!r}")
        raw_version = element.get("version")
        if raw_version != str(OWNER_VERSION):
            raise MalformedDomainError(
                f"owner marker version {raw_version!r} is not supported (this agent reads "
                f"version {OWNER_VERSION}); leaving the domain alone"
            )
        values: dict[str, str] = {}
        for attribute in ("namespace", "name", "uid", "generation", "specHash"):
            value = element.get(attribute)
            if value is None:
                raise MalformedDomainError(f"owner marker lacks {attribute!r}")
            values[attribute] = value
        if not values["generation"].isdigit() or not values["generation"].isascii():
            raise MalformedDomainError(
                f"owner marker generation {values['generation']!r} is not a number"
            )
        try:
            return cls(
                namespace=values["namespace"],
                name=values["name"],
                uid=values["uid"],
                generation=int(values["generation"]),
                spec_hash=values["specHash"],
            )
        except InvalidInputError as exc:
            raise MalformedDomainError(f"owner marker: {exc}") from exc


def find_owner(metadata: etree._Element | None) -> OwnerMetadata | None:
    """The marker inside a ``<metadata>`` element, ``None`` when there is none.

    A marker that is present but unreadable raises :class:`MalformedDomainError`: "someone
    claims this domain and we do not understand how" must not read as "not ours".
    """
    if metadata is None:
        return None
    found = metadata.findall(OWNER_TAG)
    if not found:
        return None
    if len(found) > 1:
        raise MalformedDomainError("more than one virtfleet owner marker")
    return OwnerMetadata.parse(found[0])


def owned_by(domain_xml: str, namespace: str, name: str) -> bool:
    """Whether a domain's XML carries virtfleet's owner marker of VM ``namespace/name``
    (a domain of that name without it is someone else's, never ours to touch)."""
    try:
        owner = find_owner(parse_xml(domain_xml).find("metadata"))
    except DomainError:
        return False
    return owner is not None and (owner.namespace, owner.name) == (namespace, name)
