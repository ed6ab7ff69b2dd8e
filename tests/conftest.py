"""Shared fixtures: the repository's paths and a fresh test-driver node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtfleet.hypervisor import Hypervisor, HypervisorSettings, storage

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
