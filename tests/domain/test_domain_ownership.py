"""The owner marker, domain names and the spec hash."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lxml import etree

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import (
    InvalidInputError,
    MalformedDomainError,
    OwnerMetadata,
    domain_name,
    find_owner,
    spec_hash,
)
from virtfleet.domain.ownership import MAX_DOMAIN_NAME_LENGTH, OWNER_TAG
from virtfleet.identity import METADATA_NAMESPACE

SpecFactory = Callable[..., VirtualMachineSpec]
UID = "0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10"
HASH = "a" * 64


def owner(**fields: object) -> OwnerMetadata:
    values: dict[str, object] = {
        "namespace": "ns",
        "name": "vm",
        "uid": UID,
        "generation": 7,
        "spec_hash": HASH,
        **fields,
    }
    return OwnerMetadata(**values)  # type: ignore[arg-type]


# --- domain names -------------------------------------------------------------------------


def test_domain_name_joins_namespace_and_name() -> None:
    assert domain_name("default", "web.example-1") == "default_web.example-1"


def test_domain_name_is_unambiguous() -> None:
    # '_' is illegal in both parts, so the split point is unique.
    assert domain_name("a-b", "c") != domain_name("a", "b-c")
    namespace, _, name = domain_name("a-b", "c.d").partition("_")
    assert (namespace, name) == ("a-b", "c.d")


def test_long_domain_names_are_cut_with_a_hash() -> None:
    long_name = "x" * 253
    name = domain_name("n" * 63, long_name)
    assert len(name) == MAX_DOMAIN_NAME_LENGTH
    assert name.startswith("n" * 63 + "_x")
    assert name.count("_") == 2  # the marker of a shortened name
    other = domain_name("n" * 63, "x" * 252 + "y")
    assert other != name  # the hash keeps names that share a prefix apart
    exact = "y" * (MAX_DOMAIN_NAME_LENGTH - 3)
    assert domain_name("ns", exact) == f"ns_{exact}"  # at the limit: not cut


@pytest.mark.parametrize(
    ("namespace", "name"),
    [("a_b", "c"), ("a", "b_c"), ("A", "b"), ("a", ""), ("", "a"), ("a", "b/c"), ("a", "b\x00")],
)
def test_domain_name_refuses_invalid_parts(namespace: str, name: str) -> None:
    with pytest.raises(InvalidInputError):
        domain_name(namespace, name)


# --- the marker -----------------------------------------------------------------------------


def test_marker_round_trips() -> None:
    marker = owner()
    element = marker.to_xml()
    assert element.tag == OWNER_TAG
    assert element.prefix == "virtfleet"
    assert OwnerMetadata.parse(element) == marker
    assert OwnerMetadata.parse(etree.fromstring(marker.to_string())) == marker


def test_marker_string_is_what_set_metadata_needs() -> None:
    text = owner().to_string()
    assert text.startswith("<virtfleet:owner ")
    assert f'xmlns:virtfleet="{METADATA_NAMESPACE}"' in text


@pytest.mark.parametrize(
    "fields",
    [
        {"namespace": "NS"},
        {"name": "a_b"},
        {"uid": "x"},
        {"generation": -1},
        {"generation": True},
        {"spec_hash": "ABC"},
        {"version": 2},
    ],
)
def test_marker_fields_are_checked(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        owner(**fields)


def _marker_xml(**attributes: str) -> etree._Element:
    element = owner().to_xml()
    for key, value in attributes.items():
        if value == "":
            del element.attrib[key]
        else:
            element.set(key, value)
    return element


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"version": "2"}, "version '2' is not supported"),
        ({"version": ""}, "version None"),
        ({"uid": ""}, "lacks 'uid'"),
        ({"generation": "x"}, "not a number"),
        ({"generation": "-1"}, "not a number"),
        ({"generation": "٣"}, "not a number"),  # a digit, but not an ASCII one
        ({"name": "a<b"}, "DNS subdomain"),
        ({"specHash": "zz"}, "sha256"),
    ],
)
def test_unreadable_markers_raise(attributes: dict[str, str], message: str) -> None:
    with pytest.raises(MalformedDomainError, match=message):
        OwnerMetadata.parse(_marker_xml(**attributes))


def test_parse_wants_our_element() -> None:
    with pytest.raises(MalformedDomainError):
        OwnerMetadata.parse(etree.Element("owner"))


def test_find_owner() -> None:
    assert find_owner(None) is None
    metadata = etree.Element("metadata")
    assert find_owner(metadata) is None
    etree.SubElement(metadata, "{https://example.com/other}owner", name="x")
    etree.SubElement(metadata, f"{{{METADATA_NAMESPACE}}}something-else")
    assert find_owner(metadata) is None  # other namespaces and elements are not ours
    metadata.append(owner().to_xml())
    assert find_owner(metadata) == owner()
    metadata.append(owner(generation=8).to_xml())
    with pytest.raises(MalformedDomainError, match="more than one"):
        find_owner(metadata)


# --- spec hash ------------------------------------------------------------------------------


def test_spec_hash_is_stable_and_ignores_scheduling(make_spec: SpecFactory) -> None:
    base = make_spec(cpu={"cores": 2})
    assert spec_hash(base) == spec_hash(make_spec(cpu={"cores": 2}))
    assert len(spec_hash(base)) == 64
    scheduled = make_spec(
        cpu={"cores": 2},
        runStrategy="Halted",
        nodeName="node-2",
        nodeSelector={"zone": "b"},
        evictionStrategy="LiveMigrate",
        terminationGracePeriodSeconds=1,
    )
    assert spec_hash(scheduled) == spec_hash(base)


@pytest.mark.parametrize(
    "change",
    [
        {"cpu": {"cores": 3}},
        {"memory": {"size": "256Mi"}},
        {"machine": "q35"},
        {"cloudInit": {"userData": "#cloud-config"}},
        {"disks": [{"name": "a", "source": {"image": "i"}}]},
    ],
)
def test_spec_hash_changes_with_the_domain(
    make_spec: SpecFactory, change: dict[str, object]
) -> None:
    assert spec_hash(make_spec(**change)) != spec_hash(make_spec(cpu={"cores": 2}))
