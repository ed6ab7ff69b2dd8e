"""The node's nwfilter on bridge and network NICs: rendered, read back, compared."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lxml import etree

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import DomainInputs, build_domain, diff, observe, render_xml
from virtfleet.domain.config import InterfaceConfig
from virtfleet.domain.errors import InvalidInputError
from virtfleet.domain.inputs import DEFAULT_NWFILTER

InputsFactory = Callable[..., DomainInputs]
SpecFactory = Callable[..., VirtualMachineSpec]

NICS = [
    {"name": "default"},
    {"name": "lan", "type": "bridge", "bridge": "br0"},
    {"name": "svc", "type": "network", "network": "default"},
]


def filters(xml: str) -> dict[str, str | None]:
    """NIC name (from its alias) → the filter its ``<filterref>`` names (``None``: none)."""
    root = etree.fromstring(xml.encode())
    found: dict[str, str | None] = {}
    for nic in root.findall("devices/interface"):
        ref = nic.find("filterref")
        alias = nic.find("alias")
        name = alias.get("name", "") if alias is not None else ""
        found[name.removeprefix("ua-nic-")] = ref.get("filter") if ref is not None else None
    return found


def test_bridge_and_network_nics_get_the_filter_user_nics_none(
    make_inputs: InputsFactory, make_spec: SpecFactory
) -> None:
    xml = render_xml(make_inputs(make_spec(interfaces=NICS)))
    assert filters(xml) == {"default": None, "lan": DEFAULT_NWFILTER, "svc": DEFAULT_NWFILTER}


def test_no_filter_when_the_node_turns_it_off(
    make_inputs: InputsFactory, make_spec: SpecFactory
) -> None:
    inputs = dataclasses.replace(make_inputs(make_spec(interfaces=NICS)), nwfilter=None)
    assert set(filters(render_xml(inputs)).values()) == {None}


def test_the_filtered_xml_validates_and_reads_back_without_drift(
    make_inputs: InputsFactory,
    make_spec: SpecFactory,
    relaxng: etree.RelaxNG,
) -> None:
    inputs = make_inputs(make_spec(interfaces=NICS))
    xml = render_xml(inputs)
    assert relaxng.validate(etree.fromstring(xml.encode())), relaxng.error_log
    seen = observe(xml)
    assert [i.nwfilter for i in seen.interfaces] == [None, DEFAULT_NWFILTER, DEFAULT_NWFILTER]
    assert not diff(build_domain(inputs), seen)


def test_a_filter_removed_behind_our_back_is_drift(
    make_inputs: InputsFactory, make_spec: SpecFactory
) -> None:
    inputs = make_inputs(make_spec(interfaces=NICS))
    unfiltered = render_xml(dataclasses.replace(inputs, nwfilter=None))
    change = diff(build_domain(inputs), observe(unfiltered))
    assert change.paths == ("interfaces[lan].nwfilter", "interfaces[svc].nwfilter")
    assert change.needs_restart


def test_a_filter_name_that_is_not_one_is_refused(
    make_inputs: InputsFactory, make_spec: SpecFactory
) -> None:
    inputs = make_inputs(make_spec(interfaces=NICS))
    for bad in ("", "a b", "x'/>", "../etc"):
        try:
            dataclasses.replace(inputs, nwfilter=bad)
        except InvalidInputError:
            continue
        raise AssertionError(f"nwfilter {bad!r} was accepted")


def test_interface_config_round_trips_its_filterref() -> None:
    nic = InterfaceConfig(type="bridge", source="br0", mac="02:00:00:00:00:01", filterref="x")
    assert InterfaceConfig.parse(nic.to_xml()) == nic
    assert nic.to_xml().find("filterref").get("filter") == "x"  # type: ignore[union-attr]


def test_a_vmnetwork_nics_address_is_pinned_in_the_filter() -> None:
    """With an IPAM address, the guest may send from that one only (not the gateway's,
    not another VM's): the filter's IP parameter, read back as written."""
    nic = InterfaceConfig(
        type="bridge", source="vfbr7", mac="02:00:00:00:00:01", filterref="clean-traffic",
        filter_ip="10.77.0.9",
    )  # fmt: skip
    element = nic.to_xml()
    parameter = element.find("filterref/parameter")
    assert parameter is not None
    assert (parameter.get("name"), parameter.get("value")) == ("IP", "10.77.0.9")
    assert InterfaceConfig.parse(element) == nic
