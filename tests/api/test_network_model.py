"""VMNetwork: valid and invalid specs, each rule's Python check against the cases it must
refuse, and the CRD that kubectl users see."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from virtfleet import crdgen
from virtfleet.api.base import CelRule
from virtfleet.api.network import DEFAULT_MTU, VMNetworkSpec, VMNetworkStatus
from virtfleet.api.resources import KINDS_BY_NAME
from virtfleet.api.vmhost import VMHostStatus

RULES: dict[str, CelRule] = {r.message: r for r in VMNetworkSpec.cel_rules if not r.transition}
STAR_ALONE = "namespaces: '*' (all namespaces) must be the only entry"
UNIQUE = "namespaces must be unique"
SUBNET_V4 = "subnet must be an IPv4 CIDR such as 10.20.0.0/24"
PREFIX = "subnet prefix length must be between /20 and /29"
HOST_BITS = "subnet must be the network address (host bits zero), e.g. 10.20.0.0/24"
GATEWAY_V4 = "gateway must be an IPv4 address"
GATEWAY_NEEDS_SUBNET = "gateway is only allowed with a subnet"
GATEWAY_INSIDE = "gateway must be a host address inside subnet"
DHCP_NEEDS_SUBNET = "dhcp is only allowed with a subnet"
NAT_NEEDS_GATEWAY = "nat needs a gateway: the address the nodes answer on for the VMs"
NAT_NEEDS_DHCP = (
    "nat needs dhcp: each node's gateway lives beside its DHCP server "
    "(which answers only the VMs' own addresses, those cloud-init writes too)"
)


def spec(**fields: Any) -> dict[str, Any]:
    return {"namespaces": ["shop"], **fields}


VALID = [
    spec(),
    {"namespaces": ["*"]},
    spec(namespaces=["shop", "default"], vni=1, mtu=9000),
    spec(vni=16777215, mtu=576),
    spec(subnet="10.20.0.0/20"),
    spec(subnet="192.168.7.248/29", gateway="192.168.7.249", dhcp=False),
    spec(subnet="10.20.0.0/24", gateway="10.20.0.254", dhcp=True),
    spec(subnet="10.20.0.0/24", gateway="10.20.0.1", nat=True),
    spec(subnet="10.20.0.0/24", gateway="10.20.0.1", dhcp=True, nat=True),
    spec(subnet="10.20.0.0/24", dhcp=False, nat=False),
]

#: (spec, the rule messages it breaks). Fields pass the schema, so only CEL judges them.
INVALID: list[tuple[dict[str, Any], set[str]]] = [
    (spec(namespaces=["*", "shop"]), {STAR_ALONE}),
    (spec(namespaces=["shop", "shop"]), {UNIQUE}),
    (spec(subnet="10.300.0.0/24"), {SUBNET_V4}),
    (spec(subnet="010.0.0.0/24"), {SUBNET_V4}),  # leading zeros: Go's parser refuses them too
    (spec(subnet="10.0.0.0/8"), {PREFIX}),
    (spec(subnet="10.0.0.0/30"), {PREFIX}),
    (spec(subnet="10.20.0.1/24"), {HOST_BITS}),
    (spec(subnet="10.0.0.0/8", gateway="10.0.0.1"), {PREFIX}),
    (spec(subnet="10.20.0.0/24", gateway="10.20.0.256"), {GATEWAY_V4}),
    (spec(gateway="10.20.0.1"), {GATEWAY_NEEDS_SUBNET}),
    (spec(subnet="10.20.0.0/24", gateway="10.20.1.1"), {GATEWAY_INSIDE}),
    (spec(subnet="10.20.0.0/24", gateway="10.20.0.0"), {GATEWAY_INSIDE}),
    (spec(dhcp=True), {DHCP_NEEDS_SUBNET}),
    (spec(dhcp=False, gateway="1.2.3.4"), {DHCP_NEEDS_SUBNET, GATEWAY_NEEDS_SUBNET}),
    (spec(subnet="10.20.0.0/24", nat=True), {NAT_NEEDS_GATEWAY}),
    (spec(nat=True), {NAT_NEEDS_GATEWAY}),
    (spec(subnet="10.20.0.0/24", gateway="10.20.0.1", dhcp=False, nat=True), {NAT_NEEDS_DHCP}),
]


@pytest.mark.parametrize("raw", VALID)
def test_valid_specs(raw: dict[str, Any]) -> None:
    model = VMNetworkSpec.model_validate(raw)
    assert model.to_wire() == raw  # nothing defaulted into the wire shape


@pytest.mark.parametrize(("raw", "broken"), INVALID)
def test_invalid_specs_are_refused_with_the_first_broken_rule(
    raw: dict[str, Any], broken: set[str]
) -> None:
    with pytest.raises(ValidationError) as caught:
        VMNetworkSpec.model_validate(raw)
    assert any(message in str(caught.value) for message in broken)


NONE_BROKEN: set[str] = set()


@pytest.mark.parametrize(("raw", "broken"), [(r, NONE_BROKEN) for r in VALID] + INVALID)
def test_every_rule_judges_every_case(raw: dict[str, Any], broken: set[str]) -> None:
    """Each rule alone: exactly the rules a case is listed under refuse it."""
    unvalidated = VMNetworkSpec.model_construct(**{_field(k): v for k, v in raw.items()})
    failing = {message for message, rule in RULES.items() if not rule.check(unvalidated)}
    assert failing == broken


def _field(alias: str) -> str:
    return next(n for n, f in VMNetworkSpec.model_fields.items() if (f.alias or n) == alias)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vni", 0),
        ("vni", 16777216),
        ("mtu", 575),
        ("mtu", 9001),
        ("namespaces", []),
        ("namespaces", ["Shop"]),
        ("namespaces", ["**"]),
        ("subnet", "10.0.0.0/255.255.0.0"),
        ("subnet", "fd00::/64"),
        ("subnet", "10.0.0.0"),
        ("gateway", "fd00::1"),
        ("gateway", "10.0.0.1/24"),
    ],
)
def test_schema_refusals(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        VMNetworkSpec.model_validate(spec(**{field: value}))


def test_namespaces_are_required() -> None:
    with pytest.raises(ValidationError, match="namespaces"):
        VMNetworkSpec.model_validate({})


def test_defaults_are_for_consumers() -> None:
    plain = VMNetworkSpec.model_validate(spec(subnet="10.20.0.0/24"))
    assert plain.mtu is None
    assert DEFAULT_MTU == 1450
    assert plain.dhcp_enabled
    assert not VMNetworkSpec.model_validate(spec()).dhcp_enabled
    assert not VMNetworkSpec.model_validate(spec(subnet="10.20.0.0/24", dhcp=False)).dhcp_enabled
    assert plain.allows("shop")
    assert not plain.allows("other")
    assert VMNetworkSpec.model_validate({"namespaces": ["*"]}).allows("other")


def test_status_reads_leniently() -> None:
    status = VMNetworkStatus.model_validate(
        {
            "vni": 4096,
            "dhcpAddress": "10.20.0.254",
            "addresses": [
                {
                    "address": "10.20.0.2",
                    "namespace": "shop",
                    "vm": "web",
                    "uid": "u",
                    "interface": "lan",
                    "newerField": 1,
                }
            ],
            "allocatedCount": 1,
            "somethingNew": True,
        }
    )
    assert status.addresses[0].vm == "web"
    assert status.to_wire()["dhcpAddress"] == "10.20.0.254"


def test_vmhost_reports_its_tunnel_address() -> None:
    status = VMHostStatus.model_validate({"tunnelAddress": "192.0.2.10"})
    assert status.to_wire()["tunnelAddress"] == "192.0.2.10"


def test_the_crd() -> None:
    crd = crdgen.crd_for(KINDS_BY_NAME["VMNetwork"])
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["shortNames"][0] == "vmnet"
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["VNI", "Subnet", "Addresses", "Ready", "Age"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["required"] == ["namespaces"]
    assert spec_schema["properties"]["namespaces"]["x-kubernetes-list-type"] == "set"
    rules = [v["rule"] for v in spec_schema["x-kubernetes-validations"]]
    assert sum("oldSelf" in r for r in rules) == 2  # vni and subnet are immutable once set
    assert any("isCIDR(self.subnet)" in r for r in rules)
