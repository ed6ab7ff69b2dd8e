"""A backup chain read from a bucket cannot make qemu-img read host files.

The bucket is not trusted: its layers are checked (backing file, data file) before
``qemu-img`` touches them, and a chain that does not say where an incremental's parent is
fails instead of restoring the changed clusters alone as the whole disk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtfleet.agent.backupdisk import chain_of
from virtfleet.backupstore.s3 import BackupBucket, StoreError
from virtfleet.hypervisor import UnsafeImage, images


def qcow2(path: Path, *extra: str) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", *extra, str(path), "1M"],
        check=True,
        capture_output=True,
    )
    return path


def test_the_bottom_layer_may_not_name_a_backing_file(tmp_path: Path) -> None:
    """The first layer is not rebased: a backing file in it would be read by qemu-img."""
    evil = qcow2(tmp_path / "layer-0.qcow2", "-F", "raw", "-b", "/etc/shadow", "-u")
    with pytest.raises(UnsafeImage, match="backing file"):
        images.inspect(str(evil), name="layer-0.qcow2", allow_backing=False)


def test_an_upper_layer_may_name_one_but_never_a_data_file(tmp_path: Path) -> None:
    """Upper layers get the layer below as backing (rebase -u) before anything reads them."""
    rebased = qcow2(tmp_path / "layer-1.qcow2", "-F", "raw", "-b", "/etc/shadow", "-u")
    assert images.inspect(str(rebased), name="layer-1.qcow2", allow_backing=True).format == (
        "qcow2"
    )
    data = qcow2(tmp_path / "layer-2.qcow2", "-o", f"data_file={tmp_path / 'x.raw'}")
    with pytest.raises(UnsafeImage, match="external data file"):
        images.inspect(str(data), name="layer-2.qcow2", allow_backing=True)


class Manifests(BackupBucket):
    """A bucket that only answers manifest reads (no network)."""

    def __init__(self, manifests: dict[str, Any]) -> None:
        self.manifests = manifests

    def get_json(self, key: str) -> Any | None:
        return self.manifests.get(key)


def disk(key: str) -> dict[str, Any]:
    return {
        "name": "data",
        "objectKey": key,
        "uploadedBytes": 20,
        "partSize": 16,
        "partSha256": ["0" * 64, "1" * 64],
    }


def test_the_chain_is_read_from_the_manifests_full_first() -> None:
    bucket = Manifests(
        {
            "p/b2/manifest.json": {
                "type": "Incremental",
                "parentPrefix": "p/b1/",
                "disks": [disk("p/b2/d")],
            },
            "p/b1/manifest.json": {"type": "Full", "disks": [disk("p/b1/d")]},
        }
    )
    assert [key for key, _ in chain_of(bucket, "p/b2/", "data")] == ["p/b1/d", "p/b2/d"]


def test_an_incremental_without_its_parent_is_a_broken_chain() -> None:
    """Restoring its changed clusters alone would be a silently wrong disk."""
    bucket = Manifests(
        {"p/b2/manifest.json": {"type": "Incremental", "parentPrefix": None, "disks": [disk("k")]}}
    )
    with pytest.raises(StoreError) as refused:
        chain_of(bucket, "p/b2/", "data")
    assert refused.value.reason == "BrokenChain"


def test_a_chain_that_loops_is_refused() -> None:
    bucket = Manifests(
        {
            "p/a/manifest.json": {
                "type": "Incremental",
                "parentPrefix": "p/b/",
                "disks": [disk("a")],
            },
            "p/b/manifest.json": {
                "type": "Incremental",
                "parentPrefix": "p/a/",
                "disks": [disk("b")],
            },
        }
    )
    with pytest.raises(StoreError, match="loops"):
        chain_of(bucket, "p/a/", "data")


@pytest.mark.parametrize(
    "broken",
    [
        {"partSha256": None},
        {"partSize": 0},
        {"partSha256": ["0" * 64]},  # 20 bytes in parts of 16 are two parts
        {"uploadedBytes": "many"},
    ],
)
def test_a_manifest_without_a_sound_part_list_is_refused(broken: dict[str, Any]) -> None:
    """Without each part's digest nothing could be checked: refused, never trusted."""
    entry = {**disk("p/b1/d"), **broken}
    if broken.get("partSha256", "") is None:
        del entry["partSha256"]
    bucket = Manifests({"p/b1/manifest.json": {"type": "Full", "disks": [entry]}})
    with pytest.raises(StoreError) as refused:
        chain_of(bucket, "p/b1/", "data")
    assert refused.value.reason == "UnsupportedManifest"
