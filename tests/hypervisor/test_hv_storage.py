"""Pools and volumes on the test driver (in-memory: it creates no files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtfleet.hypervisor import (
    AlreadyExists,
    Hypervisor,
    InvalidName,
    NotFound,
    OperationInvalid,
    UnsafeImage,
    Unsupported,
    VolumeRef,
    storage,
)
from virtfleet.hypervisor.storage import PoolInfo

MiB = 1024 * 1024


def attr(root: etree._Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the element at ``path`` (which must exist)."""
    element = root.find(path)
    assert element is not None, path
    return element.get(name)


async def test_ensure_pool_creates_and_is_idempotent(hv: Hypervisor, tmp_path: Path) -> None:
    path = str(tmp_path / "disks")
    info = await storage.ensure_pool(hv, "disks", path)
    assert (info.name, info.type, info.path, info.active, info.autostart) == (
        "disks",
        "dir",
        path,
        True,
        True,
    )
    again = await storage.ensure_pool(hv, "disks", path + "/")
    assert again.uuid == info.uuid
    assert (await storage.pool_info(hv, "disks")).uuid == info.uuid


async def test_ensure_pool_restarts_an_inactive_pool(hv: Hypervisor, tmp_path: Path) -> None:
    path = str(tmp_path / "disks")
    await storage.ensure_pool(hv, "disks", path, autostart=False)
    await hv.call(lambda conn: conn.storagePoolLookupByName("disks").destroy())
    info = await storage.ensure_pool(hv, "disks", path, autostart=False)
    assert info.active
    assert not info.autostart


async def test_ensure_pool_refuses_a_different_path(hv: Hypervisor, tmp_path: Path) -> None:
    await storage.ensure_pool(hv, "disks", str(tmp_path / "a"))
    with pytest.raises(AlreadyExists):
        await storage.ensure_pool(hv, "disks", str(tmp_path / "b"))


@pytest.mark.parametrize("path", ["relative/dir", "/var/lib/../../etc"])
async def test_ensure_pool_refuses_odd_paths(hv: Hypervisor, path: str) -> None:
    with pytest.raises(InvalidName):
        await storage.ensure_pool(hv, "disks", path)


async def test_pool_info_missing(hv: Hypervisor) -> None:
    with pytest.raises(NotFound):
        await storage.pool_info(hv, "nope")


async def test_blank_volume_lifecycle(hv: Hypervisor, disk_pool: PoolInfo) -> None:
    vol = await storage.create_blank(hv, "disks", "data.qcow2", 64 * MiB)
    assert (vol.pool, vol.name, vol.format, vol.capacity) == (
        "disks",
        "data.qcow2",
        "qcow2",
        64 * MiB,
    )
    assert vol.path == f"{disk_pool.path}/data.qcow2"
    assert vol.backing_path is None
    assert await storage.lookup_volume(hv, "disks", "data.qcow2") == vol

    raw = await storage.create_blank(hv, "disks", "scratch.raw", MiB, fmt="raw")
    assert raw.format == "raw"
    assert [v.name for v in await storage.list_volumes(hv, "disks")] == [
        "data.qcow2",
        "scratch.raw",
    ]

    with pytest.raises(AlreadyExists):
        await storage.create_blank(hv, "disks", "data.qcow2", MiB)

    assert await storage.delete_volume(hv, "disks", "data.qcow2") is True
    assert await storage.delete_volume(hv, "disks", "data.qcow2") is False
    assert await storage.lookup_volume(hv, "disks", "data.qcow2") is None


async def test_blank_volume_arguments(hv: Hypervisor, disk_pool: PoolInfo) -> None:
    with pytest.raises(InvalidName):
        await storage.create_blank(hv, "disks", "x.vmdk", MiB, fmt="vmdk")
    with pytest.raises(ValueError, match="positive"):
        await storage.create_blank(hv, "disks", "x", 0)
    with pytest.raises(NotFound):
        await storage.create_blank(hv, "no-such-pool", "x", MiB)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden", "a/b", ".."])
async def test_unsafe_names_never_reach_libvirt(
    hv: Hypervisor, disk_pool: PoolInfo, image_pool: PoolInfo, name: str
) -> None:
    with pytest.raises(InvalidName):
        await storage.create_blank(hv, "disks", name, MiB)
    with pytest.raises(InvalidName):
        await storage.create_overlay(hv, "disks", name, VolumeRef("images", "base"))
    with pytest.raises(InvalidName):
        await storage.create_overlay(hv, "disks", "root", VolumeRef("images", name))
    with pytest.raises(InvalidName):
        await storage.create_overlay(hv, "disks", "root", VolumeRef(name, "base"))
    with pytest.raises(InvalidName):
        await storage.lookup_volume(hv, "disks", name)
    with pytest.raises(InvalidName):
        await storage.delete_volume(hv, "disks", name)
    with pytest.raises(InvalidName):
        await storage.upload(hv, "disks", name, b"x")
    with pytest.raises(InvalidName):
        await storage.list_volumes(hv, name)
    assert await storage.list_volumes(hv, "disks") == []


async def test_overlay_backed_by_image_resolved_by_name(
    hv: Hypervisor, disk_pool: PoolInfo, image_pool: PoolInfo
) -> None:
    image = await storage.create_blank(hv, "images", "debian-12.qcow2", 32 * MiB)
    root = await storage.create_overlay(
        hv, "disks", "vm1-root.qcow2", VolumeRef("images", "debian-12.qcow2")
    )
    assert (root.format, root.capacity, root.backing_path) == ("qcow2", 32 * MiB, image.path)
    assert root.path.startswith(str(disk_pool.path))

    xml = await hv.call(
        lambda conn: (
            conn.storagePoolLookupByName("disks")
            .storageVolLookupByName("vm1-root.qcow2")
            .XMLDesc(0)
        )
    )
    assert attr(etree.fromstring(xml.encode()), "backingStore/format", "type") == "qcow2"

    bigger = await storage.create_overlay(
        hv, "disks", "vm2-root.qcow2", VolumeRef("images", "debian-12.qcow2"), 64 * MiB
    )
    assert bigger.capacity == 64 * MiB


async def test_overlay_refusals(hv: Hypervisor, disk_pool: PoolInfo, image_pool: PoolInfo) -> None:
    await storage.create_blank(hv, "images", "base.qcow2", 32 * MiB)
    with pytest.raises(NotFound):
        await storage.create_overlay(hv, "disks", "root", VolumeRef("images", "missing.qcow2"))
    with pytest.raises(OperationInvalid):
        await storage.create_overlay(hv, "disks", "root", VolumeRef("images", "base.qcow2"), MiB)
    # An image that has a backing file of its own could point QEMU anywhere: refused.
    await storage.create_overlay(hv, "images", "layered.qcow2", VolumeRef("images", "base.qcow2"))
    with pytest.raises(UnsafeImage):
        await storage.create_overlay(hv, "disks", "root", VolumeRef("images", "layered.qcow2"))
    assert await storage.lookup_volume(hv, "disks", "root") is None


async def test_upload_unsupported_on_test_driver_leaves_nothing(
    hv: Hypervisor, disk_pool: PoolInfo
) -> None:
    # virStorageVolUpload is not in the test driver; the half-made volume is removed.
    with pytest.raises(Unsupported):
        await storage.upload(hv, "disks", "seed.img", b"#cloud-config\n")
    assert await storage.lookup_volume(hv, "disks", "seed.img") is None


async def test_upload_refuses_existing_and_empty(hv: Hypervisor, disk_pool: PoolInfo) -> None:
    await storage.create_blank(hv, "disks", "seed.img", MiB, fmt="raw")
    with pytest.raises(AlreadyExists):
        await storage.upload(hv, "disks", "seed.img", b"data")
    with pytest.raises(ValueError, match="empty"):
        await storage.upload(hv, "disks", "other.img", b"")
    # replace=True deletes first; the test driver then fails at the upload itself.
    with pytest.raises(Unsupported):
        await storage.upload(hv, "disks", "seed.img", b"data", replace=True)
    assert await storage.lookup_volume(hv, "disks", "seed.img") is None


def test_volume_xml_shape() -> None:
    root = etree.fromstring(
        storage.volume_xml(
            "ov.qcow2", 1024, "qcow2", backing_path="/img/base.raw", backing_format="raw"
        ).encode()
    )
    assert root.findtext("name") == "ov.qcow2"
    assert attr(root, "capacity", "unit") == "bytes"
    assert root.findtext("capacity") == "1024"
    assert attr(root, "target/format", "type") == "qcow2"
    assert root.findtext("backingStore/path") == "/img/base.raw"
    assert attr(root, "backingStore/format", "type") == "raw"
    assert etree.fromstring(storage.volume_xml("b", 1, "raw").encode()).find("backingStore") is None


def test_xml_escapes_instead_of_templating() -> None:
    xml = storage.dir_pool_xml("p", "/srv/a&b<c>")
    assert etree.fromstring(xml.encode()).findtext("target/path") == "/srv/a&b<c>"


async def test_copy_flat_makes_a_new_qcow2_and_refuses_clashes(
    hv: Hypervisor, disk_pool: PoolInfo
) -> None:
    """A stopped VM's backup copies its volume: a qcow2 of the same capacity, without
    backing; a missing source or an existing target is refused, not overwritten."""
    await storage.create_blank(hv, disk_pool.name, "vm-root.qcow2", 64 * MiB)
    copy = await storage.copy_flat(hv, disk_pool.name, "vm-root.qcow2", "vm-root.backup.qcow2")
    assert (copy.name, copy.capacity, copy.backing_path) == (
        "vm-root.backup.qcow2",
        64 * MiB,
        None,
    )
    with pytest.raises(AlreadyExists):
        await storage.copy_flat(hv, disk_pool.name, "vm-root.qcow2", "vm-root.backup.qcow2")
    with pytest.raises(NotFound):
        await storage.copy_flat(hv, disk_pool.name, "gone.qcow2", "gone.backup.qcow2")
    with pytest.raises(InvalidName):
        await storage.copy_flat(hv, disk_pool.name, "vm-root.qcow2", "../escape")
