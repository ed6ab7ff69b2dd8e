"""Names cannot leave their pools, and a lying image is not used as a backing store.

On libvirt's test driver (in memory) with pools on real tmp_path directories, like
tests/hypervisor/test_hv_storage.py; these add the http import path and lying names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtfleet.hypervisor import (
    Hypervisor,
    HypervisorSettings,
    InvalidName,
    UnsafeImage,
    Unsupported,
    VolumeRef,
    storage,
)

MiB = 1024 * 1024
ESCAPES = ["../x", "/etc/shadow", ".hidden", "a/b", "..", "x/../../y", "", "a\x00b", "a b"]


@pytest.fixture
async def hv(tmp_path: Path) -> AsyncIterator[Hypervisor]:
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    hypervisor = Hypervisor(HypervisorSettings(uri=f"test://{node}"))
    await hypervisor.open()
    await storage.ensure_pool(hypervisor, "disks", str(tmp_path / "disks"))
    await storage.ensure_pool(hypervisor, "images", str(tmp_path / "images"))
    try:
        yield hypervisor
    finally:
        await hypervisor.close()


@pytest.mark.parametrize("name", ESCAPES)
async def test_upload_file_refuses_escaping_names(
    hv: Hypervisor, tmp_path: Path, name: str
) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * MiB)
    with pytest.raises(InvalidName):
        await storage.upload_file(hv, "disks", name, str(image))
    with pytest.raises(InvalidName):
        await storage.upload_file(hv, name, "ok.raw", str(image))
    assert await storage.list_volumes(hv, "disks") == []


async def test_upload_file_failure_leaves_nothing(hv: Hypervisor, tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * MiB)
    with pytest.raises(Unsupported):  # no virStorageVolUpload in the test driver
        await storage.upload_file(hv, "disks", "uid-root.http-base", str(image))
    assert await storage.list_volumes(hv, "disks") == []


@pytest.mark.parametrize(("name", "fmt"), [("liar.qcow2", "raw"), ("liar.raw", "qcow2")])
async def test_image_whose_name_lies_about_its_format_is_not_a_backing_store(
    hv: Hypervisor, name: str, fmt: str
) -> None:
    await storage.create_blank(hv, "images", name, MiB, fmt=fmt)
    with pytest.raises(UnsafeImage, match="named like a"):
        await storage.create_overlay(hv, "disks", "root.qcow2", VolumeRef("images", name))
    assert await storage.lookup_volume(hv, "disks", "root.qcow2") is None


async def test_honest_image_is_a_backing_store(hv: Hypervisor) -> None:
    await storage.create_blank(hv, "images", "base.qcow2", MiB)
    overlay = await storage.create_overlay(
        hv, "disks", "root.qcow2", VolumeRef("images", "base.qcow2")
    )
    assert overlay.backing_path is not None
    assert overlay.backing_path.endswith("/images/base.qcow2")
