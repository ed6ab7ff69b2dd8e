"""Fixtures for the hypervisor adapter tests, on libvirt's built-in ``test`` driver.

Every test gets its own driver instance: opening ``test:///<abs path>/node.xml`` parses
the file into a fresh in-memory state per ``open``, unlike ``test:///default``, which is
one shared instance per process. The node file holds *foreign* domains (no ownership
element, another namespace, our namespace with another element) that tests must never
see returned by ``list_owned`` nor touched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtfleet.hypervisor import Hypervisor, HypervisorSettings, storage
from virtfleet.hypervisor.storage import PoolInfo
from virtfleet.identity import METADATA_NAMESPACE

FOREIGN_PLAIN = "foreign-plain"
FOREIGN_OTHER_NS = "foreign-other-ns"
FOREIGN_OTHER_ELEMENT = "foreign-other-element"
FOREIGN_NAMES = frozenset({FOREIGN_PLAIN, FOREIGN_OTHER_NS, FOREIGN_OTHER_ELEMENT})

NODE_XML = f"""<node>
  <domain type='test'>
    <name>{FOREIGN_PLAIN}</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
    <memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  </domain>
  <domain type='test'>
    <name>{FOREIGN_OTHER_NS}</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e1940</uuid>
    <metadata><other:owner xmlns:other='https://example.com/other' name='x'/></metadata>
    <memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  </domain>
  <domain type='test'>
    <name>{FOREIGN_OTHER_ELEMENT}</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e1941</uuid>
    <metadata><vf:note xmlns:vf='{METADATA_NAMESPACE}'>not an owner</vf:note></metadata>
    <memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  </domain>
</node>
"""


@pytest.fixture
def node_uri(tmp_path: Path) -> str:
    """URI of a fresh test-driver instance holding only the foreign domains."""
    path = tmp_path / "node.xml"
    path.write_text(NODE_XML)
    return f"test://{path}"


@pytest.fixture
def settings(node_uri: str) -> HypervisorSettings:
    """Small pools and fast backoff, so reconnect tests take milliseconds."""
    return HypervisorSettings(
        uri=node_uri,
        reconnect_backoff_initial=0.01,
        reconnect_backoff_max=0.05,
        executor_workers=2,
        long_executor_workers=1,
        thread_name_prefix="test-libvirt",
    )


@pytest.fixture
async def hv(settings: HypervisorSettings) -> AsyncIterator[Hypervisor]:
    """An open :class:`Hypervisor` on a fresh driver instance, closed afterwards."""
    hypervisor = Hypervisor(settings)
    await hypervisor.open()
    try:
        yield hypervisor
    finally:
        await hypervisor.close()


@pytest.fixture
async def disk_pool(hv: Hypervisor, tmp_path: Path) -> PoolInfo:
    """A started dir pool ``disks`` on a temporary directory."""
    return await storage.ensure_pool(hv, "disks", str(tmp_path / "disks"))


@pytest.fixture
async def image_pool(hv: Hypervisor, tmp_path: Path) -> PoolInfo:
    """A started dir pool ``images`` (the node's image store)."""
    return await storage.ensure_pool(hv, "images", str(tmp_path / "images"))


@pytest.fixture
def foreign_names() -> frozenset[str]:
    """Names of the foreign domains in every fresh node."""
    return FOREIGN_NAMES
