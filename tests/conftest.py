"""Shared fixtures: the repository's paths, a fresh test-driver node, owned domain XML."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from lxml import etree

from virtfleet.hypervisor import Hypervisor, HypervisorSettings, storage
from virtfleet.identity import METADATA_ELEMENT, METADATA_NAMESPACE, METADATA_PREFIX

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def examples_dir() -> Path:
    return REPO / "examples"


@pytest.fixture
async def hv(tmp_path: Path) -> AsyncIterator[Hypervisor]:
    """``test://<file>``: each test gets its own in-memory driver with the agent's pools."""
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    hypervisor = Hypervisor(HypervisorSettings(uri=f"test://{node}", executor_workers=2))
    await hypervisor.open()
    await storage.ensure_pool(hypervisor, "virtfleet-images", "/images")
    await storage.ensure_pool(hypervisor, "virtfleet-local", "/local")
    await storage.create_blank(hypervisor, "virtfleet-images", "guest-vmlinuz", 2**20, fmt="raw")
    try:
        yield hypervisor
    finally:
        await hypervisor.close()


DomainXmlFactory = Callable[..., str]


def owned_domain_xml(
    name: str,
    uid: str | None = None,
    *,
    namespace: str = "default",
    vm_name: str | None = None,
    generation: int = 1,
    vcpus: int = 1,
    max_vcpus: int = 2,
    memory_kib: int = 131072,
) -> str:
    """A minimal test-driver domain with the ownership element the domain layer writes."""
    uid = uid or str(uuidlib.uuid4())
    domain = etree.Element("domain", type="test")
    etree.SubElement(domain, "name").text = name
    etree.SubElement(domain, "uuid").text = uid
    metadata = etree.SubElement(domain, "metadata")
    etree.SubElement(
        metadata,
        f"{{{METADATA_NAMESPACE}}}{METADATA_ELEMENT}",
        nsmap={METADATA_PREFIX: METADATA_NAMESPACE},
        namespace=namespace,
        name=vm_name or name,
        uid=uid,
        generation=str(generation),
    )
    etree.SubElement(domain, "memory", unit="KiB").text = str(memory_kib)
    etree.SubElement(domain, "vcpu", current=str(vcpus)).text = str(max_vcpus)
    os_ = etree.SubElement(domain, "os")
    etree.SubElement(os_, "type").text = "hvm"
    return etree.tostring(domain, encoding="unicode")


@pytest.fixture
def domain_xml() -> DomainXmlFactory:
    """Factory for owned domain XML (see :func:`owned_domain_xml`)."""
    return owned_domain_xml
