"""The bucket module's pure parts: key layout, part sizes and digests, the rate limit, and
the verified download against a stub client (no network)."""

from __future__ import annotations

import hashlib
import io
import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.backupstore import s3
from virtfleet.backupstore.s3 import (
    MAX_PARTS,
    PART_SIZE,
    BackupBucket,
    PartDigests,
    StoreError,
    backup_prefix,
    part_size_for,
)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", "backups/ns/b1/"),
        ("/", "backups/ns/b1/"),
        ("cluster-a", "cluster-a/backups/ns/b1/"),
        ("/cluster-a/eu/", "cluster-a/eu/backups/ns/b1/"),
    ],
)
def test_backup_prefix_layout(prefix: str, expected: str) -> None:
    """Keys must not start with '/' nor double it: a restore finds backups by this layout."""
    assert backup_prefix(prefix, "ns", "b1") == expected


def test_parts_grow_so_a_huge_disk_stays_under_the_part_limit() -> None:
    """S3 takes 10,000 parts at most: 16 MiB parts end at 160 GB; beyond, whole MiB."""
    assert part_size_for(0) == PART_SIZE
    assert part_size_for(100 * 2**20) == PART_SIZE
    huge = 4 * 2**40 + 12345
    part = part_size_for(huge)
    assert part * MAX_PARTS >= huge
    assert part % 2**20 == 0


@given(length=st.integers(min_value=1, max_value=10**7), part=st.integers(1000, 10**6))
def test_spans_cover_the_object_exactly_once(length: int, part: int) -> None:
    count = PartDigests.count(length, part)
    parts = PartDigests(length, part, ("",) * count)
    spans = [parts.span(i) for i in range(count)]
    assert spans[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))
    assert sum(n for _, n in spans) == length
    assert all(0 < n <= part for _, n in spans)


def test_the_summary_depends_on_every_part_and_its_order() -> None:
    a = PartDigests(10, 5, ("aa", "bb"))
    assert a.summary != PartDigests(10, 5, ("bb", "aa")).summary
    assert a.summary != PartDigests(10, 5, ("aa", "bc")).summary


def test_the_throttle_spaces_parts_at_the_rate() -> None:
    """Two 1 MiB parts at 1 MiB/s: the first waits its own second, the second two."""
    slept: list[float] = []
    throttle = s3._Throttle(2**20, clock=lambda: 100.0, sleep=slept.append)
    throttle.take(2**20)
    throttle.take(2**20)
    assert slept == [1.0, 2.0]
    s3._Throttle(None, sleep=slept.append).take(2**20)
    assert slept == [1.0, 2.0]


# --- the verified download --------------------------------------------------------------------


class StubClient:
    """head_object and ranged get_object over bytes held in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def head_object(self, **_: Any) -> dict[str, Any]:
        return {"ContentLength": len(self.data)}

    def get_object(self, *, Range: str, **_: Any) -> dict[str, Any]:  # noqa: N803 - boto3's
        start, end = (int(x) for x in Range.removeprefix("bytes=").split("-"))
        return {"Body": io.BytesIO(self.data[start : end + 1])}


def bucket_over(data: bytes) -> BackupBucket:
    bucket = BackupBucket.__new__(BackupBucket)
    bucket.bucket = "b"
    bucket.client = StubClient(data)
    bucket._throttle = s3._Throttle(None)
    return bucket


def digests_of(data: bytes, part: int) -> PartDigests:
    count = PartDigests.count(len(data), part)
    return PartDigests(
        len(data),
        part,
        tuple(hashlib.sha256(data[i * part : (i + 1) * part]).hexdigest() for i in range(count)),
    )


def test_a_download_in_parts_rebuilds_the_object(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000 + b"tail"
    out = tmp_path / "layer.qcow2"
    bucket_over(data).download_verified("k", out, digests_of(data, 4096), workers=3)
    assert out.read_bytes() == data


def test_a_part_that_differs_from_the_manifest_fails_the_download(tmp_path: Path) -> None:
    data = b"a" * 10_000
    parts = digests_of(data, 4096)
    tampered = data[:5000] + b"b" + data[5001:]
    with pytest.raises(StoreError) as raised:
        bucket_over(tampered).download_verified("k", tmp_path / "x", parts)
    assert raised.value.reason == "ChecksumMismatch"
    assert "part 2" in raised.value.message


def test_an_object_of_another_length_fails_before_anything_is_read(tmp_path: Path) -> None:
    parts = digests_of(b"a" * 10_000, 4096)
    with pytest.raises(StoreError) as raised:
        bucket_over(b"a" * 9_999).download_verified("k", tmp_path / "x", parts)
    assert raised.value.reason == "ChecksumMismatch"
    assert not (tmp_path / "x").exists()
