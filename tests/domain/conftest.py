"""Fixtures of the domain-layer tests: specs, inputs, schema validators, a test hypervisor."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import DomainInputs, example_inputs

UID = "0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10"
NAMESPACE = "tenant-a"
NAME = "web-1"
DOMAIN_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")

#: A spec that uses every feature the builder renders.
FULL_SPEC: dict[str, Any] = {
    "memory": {"size": "1Gi"},
    "cpu": {"cores": 2, "sockets": 1, "threads": 2, "model": "host-model"},
    "machine": "q35",
    "firmware": {"type": "uefi"},
    "disks": [
        {
            "name": "root",
            "source": {"image": "debian-12.qcow2"},
            "bootOrder": 1,
            "iotune": {"totalBytesSec": 10_000_000, "readIopsSec": 500, "writeIopsSec": 0},
        },
        {"name": "data", "bus": "scsi", "size": "10Gi", "source": {"blank": {}}, "readOnly": True},
        {"name": "legacy", "bus": "sata", "size": "1Gi", "source": {"blank": {}}, "bootOrder": 2},
        {"name": "logs", "size": "2Gi", "pool": "fast", "source": {"blank": {}}},
    ],
    "kernel": {
        "image": "vmlinuz",
        "initrd": "initrd.img",
        "cmdline": "console=ttyS0 root=/dev/vda1",
    },
    "cloudInit": {"userData": "#cloud-config\nhostname: web-1\n"},
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


def _make_spec(**fields: Any) -> VirtualMachineSpec:
    """A spec from wire-format (camelCase) fields; memory defaults to 128Mi."""
    wire: dict[str, Any] = {"memory": {"size": "128Mi"}, **fields}
    return VirtualMachineSpec.model_validate(wire)


def _make_inputs(spec: VirtualMachineSpec | None = None, **kwargs: Any) -> DomainInputs:
    """Example inputs (default node layout) for ``spec`` in tenant-a/web-1."""
    kwargs.setdefault("namespace", NAMESPACE)
    kwargs.setdefault("name", NAME)
    kwargs.setdefault("uid", UID)
    return example_inputs(spec if spec is not None else _make_spec(), **kwargs)


@pytest.fixture
def make_spec() -> Callable[..., VirtualMachineSpec]:
    """Build a spec from wire-format (camelCase) fields; memory defaults to 128Mi."""
    return _make_spec


@pytest.fixture
def make_inputs() -> Callable[..., DomainInputs]:
    """Example inputs for a spec (default: a 128Mi VM) as VM tenant-a/web-1 with uid UID."""
    return _make_inputs


@pytest.fixture
def full_spec() -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(FULL_SPEC)


@pytest.fixture
def full_inputs(full_spec: VirtualMachineSpec) -> DomainInputs:
    return _make_inputs(full_spec)


@pytest.fixture(scope="session")
def relaxng() -> etree.RelaxNG:
    """libvirt's domain schema, loaded in-process (fast enough for property tests)."""
    if not DOMAIN_SCHEMA.exists():
        pytest.skip(f"libvirt's domain schema is not installed at {DOMAIN_SCHEMA}")
    return etree.RelaxNG(etree.parse(str(DOMAIN_SCHEMA)))


@pytest.fixture(scope="session")
def virt_xml_validate() -> Callable[[str], None]:
    """Run the real ``virt-xml-validate <file> domain`` (slow: use on a few documents)."""
    binary = shutil.which("virt-xml-validate")
    if binary is None:
        pytest.skip("virt-xml-validate is not installed (Debian: libvirt-clients)")

    def validate(xml: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".xml", encoding="utf-8") as handle:
            handle.write(xml)
            handle.flush()
            result = subprocess.run(
                [binary, handle.name, "domain"], capture_output=True, text=True, check=False
            )
        assert result.returncode == 0, result.stdout + result.stderr

    return validate


@pytest.fixture(scope="session")
def test_hypervisor() -> Iterator[Any]:
    """A ``test:///default`` connection (libvirt's built-in fake hypervisor).

    Its state is shared by every ``test:///default`` connection in this process, so
    tests use their own names/UUIDs and undefine what they define (see ``define``).
    """
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


@pytest.fixture
def define(test_hypervisor: Any) -> Iterator[Callable[[str], Any]]:
    """Define a domain XML (with schema validation) and remove it after the test."""
    import libvirt

    defined: list[Any] = []

    def _define(xml: str) -> Any:
        domain = test_hypervisor.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        defined.append(domain)
        return domain

    yield _define
    for domain in defined:
        if domain.isActive():
            domain.destroy()
        domain.undefine()
