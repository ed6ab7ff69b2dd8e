"""Hostile values in every spec field: refused naming that field, or rendered harmlessly.

tests/domain/test_domain_properties.py generates *valid* specs with hostile text where the
API allows free text. This module starts from a spec that uses every field and puts one
hostile value (path escapes, markup, control characters, huge or negative numbers, wrong
types, unknown keys) into one field at a time. Each result must be one of:

* refused by the model, with every error located at that field or at an enclosing object
  (a cross-field rule), so the user is told where the problem is; or
* accepted, and then the domain XML validates against libvirt's schema and holds no
  element or attribute name that the untouched spec's rendering does not hold (nothing
  the model did not put there), and every store name stays inside its pool.

The one-shot kinds (VMSnapshot, VMRestore, VMMigration) have no XML; for them a hostile
value must be refused at its field or leave only DNS-label names behind.
"""

from __future__ import annotations

import copy
import posixpath
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lxml import etree
from pydantic import BaseModel, ValidationError

from virtfleet.api.base import DNS_LABEL_PATTERN
from virtfleet.api.migration import VMMigrationSpec
from virtfleet.api.snapshot import VMRestoreSpec, VMSnapshotSpec
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import example_inputs, render_xml
from virtfleet.hypervisor import InvalidName
from virtfleet.hypervisor.names import validate_name

DOMAIN_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
UID = "0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10"

#: Uses every field of VirtualMachineSpec (the domain tests' FULL_SPEC plus http and
#: secret-less cloud-init networkData), so every leaf below is a field to attack.
BASE: dict[str, Any] = {
    "memory": {"size": "1Gi"},
    "cpu": {"cores": 2, "sockets": 1, "threads": 2, "model": "host-model"},
    "machine": "q35",
    "firmware": {"type": "uefi"},
    "runStrategy": "Always",
    "terminationGracePeriodSeconds": 30,
    "nodeName": "node-a",
    "nodeSelector": {"disk": "ssd"},
    "disks": [
        {
            "name": "root",
            "source": {"image": "debian-12.qcow2"},
            "bootOrder": 1,
            "iotune": {"totalBytesSec": 10_000_000, "readIopsSec": 500, "writeIopsSec": 1},
        },
        {"name": "data", "bus": "scsi", "size": "10Gi", "source": {"blank": {}}, "readOnly": True},
        {"name": "legacy", "bus": "sata", "size": "1Gi", "source": {"blank": {}}, "bootOrder": 2},
        {"name": "logs", "size": "2Gi", "pool": "fast", "source": {"blank": {}}},
        {
            "name": "fetched",
            "size": "4Gi",
            "source": {"http": {"url": "https://example.com/i.qcow2", "sha256": "a" * 64}},
        },
    ],
    "kernel": {"image": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0"},
    "cloudInit": {"userData": "#cloud-config\nhostname: web-1\n", "networkData": "version: 2\n"},
    "interfaces": [
        {"name": "default"},
        {
            "name": "lan",
            "type": "bridge",
            "bridge": "br0",
            "model": "e1000e",
            "macAddress": "02:AB:CD:EF:01:23",
            "bandwidth": {
                "inbound": {"averageKBps": 1000, "peakKBps": 2000, "burstKB": 512},
                "outbound": {"averageKBps": 500},
            },
        },
        {"name": "svc", "type": "network", "network": "default", "model": "rtl8139"},
    ],
}
ONE_SHOT: dict[type[BaseModel], dict[str, Any]] = {
    VMSnapshotSpec: {
        "vmName": "web",
        "includeMemory": True,
        "quiesce": False,
        "deletionPolicy": "Retain",
        "failureDeadline": "5m",
    },
    VMRestoreSpec: {"vmName": "web", "snapshotName": "before"},
    VMMigrationSpec: {
        "vmName": "web",
        "targetNode": "node-b",
        "mode": "Live",
        "policy": {
            "bandwidthMiBps": 100,
            "maxDowntimeMs": 300,
            "completionTimeoutPerGiB": 60,
            "autoConverge": True,
            "postCopy": False,
        },
    },
}

Path_ = tuple[str | int, ...]


def paths(value: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every field (object key or list item) below ``value``, objects and leaves alike."""
    out: list[Path_] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((*prefix, key))
            out.extend(paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((*prefix, index))
            out.extend(paths(item, (*prefix, index)))
    return out


def objects(value: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every object (dict) below and including ``value``: places for an unknown key."""
    found = [prefix] if isinstance(value, dict) else []
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in children:
        found.extend(objects(item, (*prefix, key)))
    return found


def replaced(spec: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    holder: Any = out
    for part in path[:-1]:
        holder = holder[part]
    holder[path[-1]] = value
    return out


ESCAPES = [
    "..", "../../etc/shadow", "/etc/shadow", "a/../../b", ".hidden", "x/y", "x\x00y",
    "file:///etc/passwd", "http://169.254.169.254/latest", "ftp://x/y", "~root",
]  # fmt: skip
MARKUP = [
    "</name><qemu:commandline/>", "<![CDATA[x]]>", "&lt;", "&amp;", "\"'", "]]>", "<!--",
    "\n<devices>", "\u202e", "𝄞", "a\tb", "\r\n",
]  # fmt: skip
hostile_text = st.lists(st.sampled_from(ESCAPES + MARKUP) | st.text(max_size=6), max_size=4).map(
    "".join
)
hostile_values = st.one_of(
    hostile_text,
    st.sampled_from(ESCAPES + MARKUP),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64, 1.5, float("inf"), float("nan")]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["x", "size", "image", "$ref"]), hostile_text, max_size=2),
)


def located(error_loc: tuple[Any, ...], path: Path_) -> bool:
    """Is a pydantic error at ``path``, below it, or on an enclosing object (CEL rules)?"""
    loc = tuple(error_loc)
    return loc[: len(path)] == path or path[: len(loc)] == loc


def assert_refused_at(exc: ValidationError, path: Path_) -> None:
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not _internal(p))
        assert located(loc, path), f"error at {loc} for a hostile value at {path}: {error['msg']}"
        assert error["msg"], error


def _internal(part: Any) -> bool:
    """pydantic's union/validator branch names in a loc (not fields)."""
    return isinstance(part, str) and (
        part.startswith(("function-", "tagged-union", "constrained-str", "json-or-python"))
        or part in {"int", "str", "float", "bool", "none", "list", "dict"}
        or part[:1].isupper()
    )


_schema: etree.RelaxNG | None = None


def relaxng() -> etree.RelaxNG:
    global _schema
    if not DOMAIN_SCHEMA.exists():
        pytest.skip(f"libvirt's domain schema is not installed at {DOMAIN_SCHEMA}")
    if _schema is None:
        _schema = etree.RelaxNG(etree.parse(str(DOMAIN_SCHEMA)))
    return _schema


def vocabulary(xml: str) -> set[str]:
    """Element and attribute names (with their element) of a rendered domain."""
    names: set[str] = set()
    for element in etree.fromstring(xml.encode()).iter():
        if not isinstance(element.tag, str):
            names.add(f"<non-element {type(element).__name__}>")
            continue
        names.add(element.tag)
        # lxml-stubs type attribute names str | bytes; lxml gives str.
        names.update(f"{element.tag}@{attribute}" for attribute in element.attrib)  # type: ignore[str-bytes-safe]
    return names


def render(spec: VirtualMachineSpec) -> str:
    return render_xml(example_inputs(spec, namespace="tenant-a", name="web-1", uid=UID))


BASE_XML = render(VirtualMachineSpec.model_validate(BASE))


def _variant(**changes: Any) -> str:
    spec = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = spec
        for part in parents:
            target = target[part]
        target[leaf] = value
    return render(VirtualMachineSpec.model_validate(spec))


#: What the model itself may put into a domain: the base, plus the shapes a legitimate
#: other choice of an enum-like field renders (a named CPU model adds match/fallback).
BASE_VOCABULARY = vocabulary(BASE_XML) | vocabulary(_variant(cpu__model="qemu64"))
VM_PATHS = paths(BASE)
#: Maps whose keys are the user's (labels), not fields.
FREE_MAPS = {("nodeSelector",)}
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_base_spec_renders_and_validates() -> None:
    assert relaxng().validate(etree.fromstring(BASE_XML.encode())), relaxng().error_log
    assert len(VM_PATHS) > 60  # the walk reaches nested fields


def check_vm(spec: dict[str, Any], path: Path_) -> None:
    try:
        model = VirtualMachineSpec.model_validate(spec)
    except ValidationError as exc:
        assert_refused_at(exc, path)
        return
    xml = render(model)
    root = etree.fromstring(xml.encode())
    assert relaxng().validate(root), f"{path}: {relaxng().error_log}"
    extra = vocabulary(xml) - BASE_VOCABULARY
    assert not extra, f"a value at {path} put {extra} into the domain"
    for disk in model.disks:
        for name in (disk.pool, disk.source.image):
            if name is not None:
                confined(name)
    if model.kernel is not None:
        for name in (model.kernel.image, model.kernel.initrd):
            if name is not None:
                confined(name)


def confined(name: str) -> None:
    """A store name the API accepted is a safe volume name that stays in its pool dir."""
    validate_name(name)
    root = "/var/lib/libvirt/images/pool"
    assert posixpath.normpath(posixpath.join(root, name)).startswith(root + "/")


@SETTINGS
@given(path=st.sampled_from(VM_PATHS), value=hostile_values)
@example(path=("cpu", "model"), value="0")  # a named model: match/fallback are the model's
def test_hostile_value_in_any_vm_field(path: Path_, value: Any) -> None:
    check_vm(replaced(BASE, path, value), path)


@SETTINGS
@given(
    path=st.sampled_from([p for p in objects(BASE) if p not in FREE_MAPS]),
    key=st.sampled_from(["x", "qemu:commandline", "$x", "Memory"]),
)
def test_unknown_key_anywhere_is_refused_there(path: Path_, key: str) -> None:
    spec = copy.deepcopy(BASE)
    holder: Any = spec
    for part in path:
        holder = holder[part]
    holder[key] = "x"
    with pytest.raises(ValidationError) as caught:
        VirtualMachineSpec.model_validate(spec)
    assert_refused_at(caught.value, (*path, key))


@SETTINGS
@given(
    kind_path=st.sampled_from([(kind, p) for kind, base in ONE_SHOT.items() for p in paths(base)]),
    value=hostile_values,
)
def test_hostile_value_in_any_one_shot_field(
    kind_path: tuple[type[BaseModel], Path_], value: Any
) -> None:
    kind, path = kind_path
    try:
        model = kind.model_validate(replaced(ONE_SHOT[kind], path, value))
    except ValidationError as exc:
        assert_refused_at(exc, path)
        return
    wire = model.model_dump(by_alias=True)
    for field in ("vmName", "snapshotName", "targetNode"):
        if wire.get(field) is not None:
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", wire[field]), wire


@settings(max_examples=1000, deadline=None)
@given(name=st.text(max_size=40) | hostile_text)
def test_any_name_validate_name_accepts_stays_in_its_root(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    confined(name)
    assert not re.search(r"[\x00-\x20/\\]", name)


def test_dns_label_pattern_is_anchored() -> None:
    """Names the API takes as labels cannot carry path or markup characters."""
    assert DNS_LABEL_PATTERN.startswith("^")
    assert DNS_LABEL_PATTERN.endswith("$")
