"""Property tests: any valid spec renders to schema-valid, injection-free, round-tripping XML.

The strategy is written from the API models' constraints (DNS labels, store names, CEL
rules) and kept small (a few disks and NICs) so the suite stays fast. User strings are
mixed with hostile fragments (quotes, ``<``, ``&``, ``]]>``, newlines, markup, unicode).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from pydantic import ValidationError

from virtfleet.api.virtualmachine import InterfaceType, VirtualMachineSpec
from virtfleet.domain import (
    DomainConfig,
    DomainInputs,
    InvalidInputError,
    UnsafeValueError,
    build_domain,
    diff,
    example_inputs,
    observe,
    parse_xml,
    render_xml,
)
from virtfleet.domain.naming import CLOUD_INIT_ALIAS
from virtfleet.identity import METADATA_NAMESPACE, derive_mac

SENTINEL = "vf-userdata-sentinel-5b1e"
OWNER = f"{{{METADATA_NAMESPACE}}}owner"

# --- strategies, from the models' constraints ------------------------------------------------

dns_labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?\Z")
dns_subdomains = st.lists(dns_labels, min_size=1, max_size=3).map(".".join)
store_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,12}\Z").filter(lambda s: ".." not in s)
#: VMNetwork names (DNS subdomains).
network_names = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?\Z")
bridge_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
#: Characters libvirt keeps unchanged: XML 1.0 ``Char`` without CR (libvirt writes it raw).
xml_chars = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters="\ufffe\uffff"
) | st.sampled_from("\t\n\x7f\x85\u2028")
hostile = st.sampled_from(
    [
        '"',
        "'",
        "<",
        ">",
        "&",
        "]]>",
        "\n",
        "\t",
        "</cmdline>",
        "<qemu:commandline/>",
        "&amp;",
        "&lt;",
        "<!--",
        "-->",
        "<![CDATA[x]]>",
        "☃",
        "𝄞",
        "\u202e",
        "é",
        "　",
    ]
)
user_text = st.lists(st.one_of(hostile, st.text(xml_chars, max_size=8)), max_size=8).map("".join)
#: What the API lets through where it asks for printable text (e.g. a kernel command line).
printable_text = user_text.map(lambda s: re.sub("[\x00-\x1f\x7f]", "", s))
counts = st.integers(min_value=0, max_value=10**12)


@st.composite
def iotunes(draw: st.DrawFn) -> dict[str, int]:
    tune: dict[str, int] = {}
    for unit in ("Bytes", "Iops"):
        style = draw(st.sampled_from(["none", "total", "split"]))
        if style == "total":
            tune[f"total{unit}Sec"] = draw(counts)
        elif style == "split":
            for side in ("read", "write"):
                if draw(st.booleans()):
                    tune[f"{side}{unit}Sec"] = draw(counts)
    return tune


@st.composite
def disk_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(dns_labels, unique=True, max_size=4))
    orders = draw(st.permutations(range(1, 65)))
    disks = []
    for index, name in enumerate(names):
        bus = draw(st.sampled_from(["virtio", "sata", "scsi"]))
        disk: dict[str, Any] = {"name": name, "bus": bus}
        kind = draw(st.sampled_from(["image", "blank", "http"]))
        if kind == "image":
            disk["source"] = {"image": draw(store_names)}
        elif kind == "blank":
            disk["source"] = {"blank": {}}
            disk["size"] = draw(st.sampled_from(["1Mi", "10Gi", "1.5G", "1e9"]))
        else:
            disk["source"] = {"http": {"url": "https://example.com/i.qcow2", "sha256": "0" * 64}}
        if draw(st.booleans()):
            disk["bootOrder"] = orders[index]
        if bus != "sata" and draw(st.booleans()):  # QEMU refuses read-only SATA disks
            disk["readOnly"] = True
        if draw(st.booleans()):
            disk["pool"] = draw(store_names)
        if draw(st.booleans()):
            disk["iotune"] = draw(iotunes())
        disks.append(disk)
    return disks


def bandwidth_limits() -> st.SearchStrategy[dict[str, int]]:
    limit = st.integers(min_value=1, max_value=2**32 - 1)
    return st.fixed_dictionaries(
        {"averageKBps": limit}, optional={"peakKBps": limit, "burstKB": limit}
    )


@st.composite
def interface_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(dns_labels, unique=True, max_size=3))
    nics = []
    for index, name in enumerate(names):
        kind = draw(st.sampled_from(["user", "bridge", "network"]))
        nic: dict[str, Any] = {"name": name, "type": kind}
        if kind == "bridge":
            nic["bridge"] = draw(bridge_names)
        if kind == "network":
            nic["network"] = draw(network_names)
        if draw(st.booleans()):
            nic["model"] = draw(st.sampled_from(["virtio", "e1000", "e1000e", "rtl8139"]))
        if draw(st.booleans()):
            mac = f"02:00:5e:00:00:{index:02x}"
            nic["macAddress"] = mac.upper() if draw(st.booleans()) else mac
        if kind != "user" and draw(st.booleans()):  # user NICs cannot be shaped
            nic["bandwidth"] = draw(
                st.fixed_dictionaries(
                    {}, optional={"inbound": bandwidth_limits(), "outbound": bandwidth_limits()}
                )
            )
        nics.append(nic)
    return nics


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "memory": {
            "size": draw(
                st.one_of(
                    st.integers(16, 65536).map(lambda n: f"{n}Mi"),
                    st.sampled_from(["1Gi", "1.5Gi", "100M", "1G", "134217728", "0.25Gi"]),
                )
            )
        },
        "cpu": draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "cores": st.integers(1, 4),
                    "sockets": st.integers(1, 2),
                    "threads": st.integers(1, 2),
                    "model": st.sampled_from(
                        ["host-model", "host-passthrough", "maximum", "qemu64", "Skylake-Client"]
                    ),
                },
            )
        ),
        "disks": draw(disk_lists()),
        "interfaces": draw(interface_lists()),
        "runStrategy": draw(st.sampled_from(["Always", "Halted", "Manual"])),
    }
    if draw(st.booleans()):
        wire["machine"] = draw(st.sampled_from(["pc", "q35", "pc-q35-7.2", "pc-i440fx-7.2"]))
    if draw(st.booleans()):
        wire["firmware"] = {"type": draw(st.sampled_from(["bios", "uefi"]))}
    if draw(st.booleans()):
        kernel: dict[str, Any] = {"image": draw(store_names)}
        if draw(st.booleans()):
            kernel["initrd"] = draw(store_names)
        if draw(st.booleans()):
            kernel["cmdline"] = draw(printable_text)
        wire["kernel"] = kernel
    if draw(st.booleans()):
        wire["cloudInit"] = {"userData": f"#cloud-config\n# {SENTINEL}\n{draw(user_text)}"}
    return wire


@st.composite
def domain_inputs(draw: st.DrawFn) -> DomainInputs:
    spec = VirtualMachineSpec.model_validate(draw(specs()))
    passthrough = spec.cpu.model == "host-passthrough"
    return example_inputs(
        spec,
        namespace=draw(dns_labels),
        name=draw(dns_subdomains),
        uid=str(draw(st.uuids())),
        generation=draw(st.integers(0, 2**40)),
        domain_type="kvm" if passthrough else draw(st.sampled_from(["qemu", "kvm"])),
    )


# --- what the model may put in a domain ---------------------------------------------------------

#: Every element path the builder can emit, with the attributes allowed on it.
ALLOWED: dict[str, frozenset[str]] = {
    path: frozenset(attributes.split())
    for path, attributes in {
        "domain": "type",
        "domain/name": "",
        "domain/uuid": "",
        "domain/metadata": "",
        f"domain/metadata/{OWNER}": "version namespace name uid generation specHash",
        "domain/memory": "unit",
        "domain/currentMemory": "unit",
        "domain/vcpu": "placement",
        "domain/os": "firmware",
        "domain/os/type": "arch machine",
        "domain/os/kernel": "",
        "domain/os/initrd": "",
        "domain/os/cmdline": "",
        "domain/features": "",
        "domain/features/acpi": "",
        "domain/features/apic": "",
        "domain/cpu": "mode match",
        "domain/cpu/model": "fallback",
        "domain/cpu/topology": "sockets cores threads",
        "domain/clock": "offset",
        "domain/on_poweroff": "",
        "domain/on_reboot": "",
        "domain/on_crash": "",
        "domain/devices": "",
        "domain/devices/emulator": "",
        "domain/devices/disk": "type device",
        "domain/devices/disk/driver": "name type cache discard",
        "domain/devices/disk/source": "file dev",
        "domain/devices/disk/target": "dev bus",
        "domain/devices/disk/iotune": "",
        **{
            f"domain/devices/disk/iotune/{limit}": ""
            for limit in [
                "total_bytes_sec",
                "read_bytes_sec",
                "write_bytes_sec",
                "total_iops_sec",
                "read_iops_sec",
                "write_iops_sec",
            ]
        },
        "domain/devices/disk/readonly": "",
        "domain/devices/disk/boot": "order",
        "domain/devices/disk/alias": "name",
        "domain/devices/controller": "type index model",
        "domain/devices/interface": "type",
        "domain/devices/interface/mac": "address",
        "domain/devices/interface/source": "bridge network",
        "domain/devices/interface/bandwidth": "",
        "domain/devices/interface/bandwidth/inbound": "average peak burst",
        "domain/devices/interface/bandwidth/outbound": "average peak burst",
        "domain/devices/interface/model": "type",
        "domain/devices/interface/filterref": "filter",
        "domain/devices/interface/filterref/parameter": "name value",
        "domain/devices/interface/alias": "name",
        "domain/devices/interface/mtu": "size",
        "domain/devices/serial": "type",
        "domain/devices/serial/log": "file append",
        "domain/devices/serial/target": "port",
        "domain/devices/console": "type",
        "domain/devices/console/log": "file append",
        "domain/devices/console/target": "type port",
        "domain/devices/memballoon": "model",
        "domain/devices/rng": "model",
        "domain/devices/rng/backend": "model",
        "domain/devices/channel": "type",
        "domain/devices/channel/source": "mode",
        "domain/devices/channel/target": "type name",
    }.items()
}


def element_paths(root: etree._Element) -> list[tuple[str, etree._Element]]:
    result = []
    for element in root.iter():
        assert isinstance(element.tag, str), f"unexpected node {element!r}"  # no comments/PIs
        path = [element.tag] + [ancestor.tag for ancestor in element.iterancestors()]
        result.append(("/".join(reversed(path)), element))
    return result


def assert_only_modelled_content(inputs: DomainInputs, root: etree._Element) -> None:
    spec = inputs.spec
    for path, element in element_paths(root):
        assert path in ALLOWED, f"unexpected element {path}"
        extra = set(element.attrib) - ALLOWED[path]
        assert not extra, f"unexpected attributes {extra} on {path}"
    assert len(root.findall("metadata/*")) == 1
    disks = root.findall("devices/disk")
    assert len(disks) == len(spec.disks) + (spec.cloud_init is not None)
    assert len(root.findall("devices/interface")) == len(spec.interfaces)
    for single in ("name", "uuid", "memory", "vcpu", "os", "cpu", "devices", "devices/serial"):
        assert len(root.findall(single)) == 1, single
    # User strings come back exactly, as data.
    cmdline = spec.kernel.cmdline if spec.kernel is not None else None
    assert root.findtext("os/cmdline") == (cmdline or None)
    for nic, element in zip(spec.interfaces, root.findall("devices/interface"), strict=True):
        source = element.find("source")
        attached = inputs.resources.networks.get(nic.name)  # a VMNetwork: the node's bridge
        expected = attached.bridge if attached is not None else nic.bridge
        assert (
            source.get("bridge") or source.get("network") if source is not None else None
        ) == expected
        assert element.find("mac").get("address") == (  # type: ignore[union-attr]
            (nic.mac_address or derive_mac(inputs.uid, nic.name)).lower()
        )
    assert SENTINEL not in etree.tostring(root, encoding="unicode")


def assert_round_trip(inputs: DomainInputs, xml: str) -> None:
    spec = inputs.spec
    config = build_domain(inputs)
    assert DomainConfig.from_string(xml) == config
    seen = observe(xml)
    assert not diff(config, seen)
    assert seen.owner == inputs.owner
    assert seen.uuid == inputs.uid
    assert seen.memory_bytes == spec.memory.size.mebibytes * 2**20 >= spec.memory.size.bytes
    assert (seen.sockets, seen.cores, seen.threads) == (
        spec.cpu.sockets,
        spec.cpu.cores,
        spec.cpu.threads,
    )
    assert seen.cpu_model == spec.cpu.model
    assert seen.machine == spec.machine
    assert seen.firmware == spec.firmware.type.value
    for disk, got in zip(spec.disks, seen.disks, strict=True):
        assert (got.name, got.bus, got.readonly, got.boot_order) == (
            disk.name,
            disk.bus.value,
            disk.read_only,
            disk.boot_order,
        )
        assert got.path == inputs.resources.disks[disk.name].path
    for nic, got_nic in zip(spec.interfaces, seen.interfaces, strict=True):
        kind = "bridge" if nic.type == InterfaceType.NETWORK else nic.type.value  # VMNetwork
        assert (got_nic.name, got_nic.type, got_nic.model) == (nic.name, kind, nic.model.value)
    assert seen.cmdline == ((spec.kernel.cmdline or None) if spec.kernel else None)
    seed = [d for d in DomainConfig.from_string(xml).disks if d.alias == CLOUD_INIT_ALIAS]
    assert len(seed) == (spec.cloud_init is not None)


# --- the properties ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=domain_inputs())
def test_any_valid_spec_renders_safe_valid_xml(
    inputs: DomainInputs, relaxng: etree.RelaxNG
) -> None:
    xml = render_xml(inputs)
    root = parse_xml(xml)
    assert relaxng.validate(root), relaxng.error_log
    assert_only_modelled_content(inputs, root)
    assert_round_trip(inputs, xml)


@settings(max_examples=5, deadline=None)
@given(inputs=domain_inputs())
def test_some_specs_pass_virt_xml_validate(inputs: DomainInputs, virt_xml_validate: Any) -> None:
    virt_xml_validate(render_xml(inputs))


@settings(max_examples=15, deadline=None)
@given(inputs=domain_inputs())
def test_some_specs_define_and_start_on_the_test_driver(
    inputs: DomainInputs, test_hypervisor: Any
) -> None:
    import libvirt

    domain = test_hypervisor.defineXMLFlags(render_xml(inputs), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        domain.create()
        seen = observe(domain.XMLDesc(0))
        assert not diff(build_domain(inputs), seen), diff(build_domain(inputs), seen)
    finally:
        if domain.isActive():
            domain.destroy()
        domain.undefine()


_ILLEGAL = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@settings(max_examples=200, deadline=None)
@given(cmdline=st.text(max_size=40))
def test_any_cmdline_round_trips_or_is_refused(cmdline: str) -> None:
    wire = {"memory": {"size": "64Mi"}, "kernel": {"image": "k", "cmdline": cmdline}}
    if re.search("[\x00-\x1f\x7f]", cmdline):  # the API refuses control characters
        with pytest.raises(ValidationError, match=r"kernel\.cmdline"):
            VirtualMachineSpec.model_validate(wire)
        return
    spec = VirtualMachineSpec.model_validate(wire)
    inputs = example_inputs(spec, namespace="ns", name="vm")
    if _ILLEGAL.search(cmdline):  # what the builder refuses on its own, as a second line
        with pytest.raises(UnsafeValueError, match=r"spec\.kernel\.cmdline"):
            render_xml(inputs)
        return
    assert observe(render_xml(inputs)).cmdline == (cmdline or None)


@settings(max_examples=200, deadline=None)
@given(
    namespace=st.one_of(dns_labels, st.text(max_size=12)), name=st.one_of(dns_subdomains, user_text)
)
def test_identity_strings_are_names_or_refused(namespace: str, name: str) -> None:
    spec = VirtualMachineSpec.model_validate({"memory": {"size": "64Mi"}})
    try:
        inputs = example_inputs(spec, namespace=namespace, name=name)
    except InvalidInputError:
        return
    assert re.fullmatch(r"[a-z0-9][-a-z0-9]*", namespace)
    assert re.fullmatch(r"[a-z0-9][-a-z0-9.]*", name)
    root = parse_xml(render_xml(inputs))
    assert root.findtext("name") == f"{namespace}_{name}"


@given(uid=st.uuids(), name=dns_labels)
def test_derived_macs_are_deterministic_unicast_and_local(uid: Any, name: str) -> None:
    mac = derive_mac(str(uid), name)
    assert mac == derive_mac(str(uid), name)
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
    first = int(mac[:2], 16)
    assert first & 1 == 0  # unicast
    assert first & 2 == 2  # locally administered
