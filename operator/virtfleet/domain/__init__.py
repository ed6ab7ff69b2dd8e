"""Spec → libvirt domain XML, domain XML → observed state, and the difference between them.

Pure code: no libvirt connection, no I/O. The agent resolves host resources, then
:func:`build_domain` / :func:`render_xml` turn :class:`DomainInputs` into a domain;
:func:`observe` reads a domain XML back and :func:`diff` says what differs and whether a
running domain can take it live.
"""

from virtfleet.domain.build import build_domain, render_xml
from virtfleet.domain.config import DomainConfig, parse_xml
from virtfleet.domain.diff import Apply, Change, DomainDiff, diff
from virtfleet.domain.errors import (
    DomainError,
    InvalidInputError,
    MalformedDomainError,
    UnsafeValueError,
)
from virtfleet.domain.examples import example_inputs, example_node_resources
from virtfleet.domain.inputs import DiskBacking, DomainInputs, DomainType, NodeResources
from virtfleet.domain.observe import ObservedDisk, ObservedDomain, ObservedInterface, observe
from virtfleet.domain.ownership import OwnerMetadata, domain_name, find_owner, spec_hash

__all__ = [
    "Apply",
    "Change",
    "DiskBacking",
    "DomainConfig",
    "DomainDiff",
    "DomainError",
    "DomainInputs",
    "DomainType",
    "InvalidInputError",
    "MalformedDomainError",
    "NodeResources",
    "ObservedDisk",
    "ObservedDomain",
    "ObservedInterface",
    "OwnerMetadata",
    "UnsafeValueError",
    "build_domain",
    "diff",
    "domain_name",
    "example_inputs",
    "example_node_resources",
    "find_owner",
    "observe",
    "parse_xml",
    "render_xml",
    "spec_hash",
]
