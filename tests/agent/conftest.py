"""Fixtures shared by the agent's tests: a fresh test-driver node with the agent's pools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtfleet.hypervisor import Hypervisor, HypervisorSettings, storage


@pytest.fixture
async def hv(tmp_path: Path) -> AsyncIterator[Hypervisor]:
    """``test://<file>``: each test gets its own in-memory driver, not the shared default."""
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
