"""The bucket module's pure parts: key layout, the reader→uploader pipe, the rate limit.

No network: ``ChunkPipe`` is exercised with two real threads, ``_ChunkReader`` with random chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.backupstore.s3 import (
    MAX_PARTS,
    PART_SIZE,
    BackupBucket,
    ChunkPipe,
    StoreError,
    _ChunkReader,
    backup_prefix,
)

#: Generous: only a broken pipe (a deadlock) ever gets near it.
JOIN_SECONDS = 10.0


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


# --- ChunkPipe -------------------------------------------------------------------------------


class Thread:
    """A thread that keeps what its function returned or raised."""

    def __init__(self, target: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._target()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = JOIN_SECONDS) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "thread still blocked: the pipe deadlocked"

    def blocked_after(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return self._thread.is_alive()


def produce(pipe: ChunkPipe, chunks: list[bytes], *, failed: bool = False) -> Callable[[], None]:
    def run() -> None:
        for chunk in chunks:
            pipe.put(chunk)
        pipe.finish(failed=failed)

    return run


def test_chunks_pass_in_order_through_a_small_pipe() -> None:
    """Many more chunks than the depth: back-pressure must neither lose nor reorder any."""
    chunks = [f"chunk-{i}".encode() for i in range(200)]
    pipe = ChunkPipe(depth=2)
    producer = Thread(produce(pipe, chunks))
    consumer = Thread(lambda: list(pipe))
    producer.join()
    consumer.join()
    assert producer.error is None
    assert consumer.error is None
    assert consumer.result == chunks


def test_an_empty_stream_ends_cleanly() -> None:
    """A zero-length volume uploads as an empty object, not an error."""
    pipe = ChunkPipe()
    pipe.finish()
    assert list(pipe) == []


def test_a_waiting_consumer_is_woken_by_finish() -> None:
    """The uploader blocks on an empty pipe until the reader says it is done."""
    pipe = ChunkPipe()
    consumer = Thread(lambda: list(pipe))
    assert consumer.blocked_after(0.1)
    pipe.put(b"last")
    pipe.finish()
    consumer.join()
    assert consumer.result == [b"last"]


def test_the_pipe_is_bounded() -> None:
    """A full pipe blocks the reader (memory stays at ``depth`` chunks) until a chunk is taken."""
    pipe = ChunkPipe(depth=2)
    pipe.put(b"a")
    pipe.put(b"b")
    producer = Thread(lambda: pipe.put(b"c"))
    assert producer.blocked_after(0.2)
    chunks = iter(pipe)
    assert next(chunks) == b"a"
    producer.join()
    assert producer.error is None
    pipe.finish()
    assert list(chunks) == [b"b", b"c"]


def test_a_reader_failure_makes_the_upload_raise() -> None:
    """A truncated stream must not complete as an object: the iterator raises, after the
    chunks already read (the uploader then aborts the multipart upload)."""
    pipe = ChunkPipe(depth=2)
    producer = Thread(produce(pipe, [b"1", b"2", b"3"], failed=True))
    got: list[bytes] = []

    def consume() -> None:
        for chunk in pipe:
            got.append(chunk)

    consumer = Thread(consume)
    producer.join()
    consumer.join()
    assert got == [b"1", b"2", b"3"]
    assert isinstance(consumer.error, StoreError)
    assert consumer.error.reason == "SourceFailed"


def test_a_reader_failure_before_any_chunk_raises() -> None:
    """Even with nothing read, a failed reader is not an empty (successful) stream."""
    pipe = ChunkPipe()
    pipe.finish(failed=True)
    with pytest.raises(StoreError) as caught:
        list(pipe)
    assert caught.value.reason == "SourceFailed"


def test_put_raises_after_the_consumer_failed() -> None:
    """The reader stops at once when the upload has failed, even with room in the pipe."""
    pipe = ChunkPipe(depth=8)
    pipe.consumer_failed()
    with pytest.raises(StoreError) as caught:
        pipe.put(b"x")
    assert caught.value.reason == "UploadFailed"


def test_a_consumer_failure_wakes_a_blocked_reader() -> None:
    """A reader waiting on a full pipe must not hang when the uploader gives up."""
    pipe = ChunkPipe(depth=1)
    pipe.put(b"a")
    producer = Thread(lambda: pipe.put(b"b"))
    assert producer.blocked_after(0.1)
    pipe.consumer_failed()
    producer.join()
    assert isinstance(producer.error, StoreError)
    assert producer.error.reason == "UploadFailed"


# --- _ChunkReader and part sizes ----------------------------------------------------------


@given(
    chunks=st.lists(st.binary(min_size=0, max_size=50), max_size=20),
    size=st.integers(min_value=1, max_value=64),
)
def test_the_reader_returns_the_chunks_bytes_in_order_whatever_the_read_size(
    chunks: list[bytes], size: int
) -> None:
    """upload_fileobj reads fixed sizes; the bytes and the count must be the stream's."""
    reader = _ChunkReader(iter(chunks))
    got = bytearray()
    while block := reader.read(size):
        assert len(block) <= size
        got += block
    assert bytes(got) == b"".join(chunks)
    assert reader.total == len(got)


def test_parts_grow_so_a_huge_disk_stays_under_the_part_limit() -> None:
    """S3 takes 10,000 parts at most: 16 MiB parts end at 160 GB."""
    bucket = BackupBucket.__new__(BackupBucket)
    bucket.rate = None
    assert bucket._transfers(0).multipart_chunksize == PART_SIZE
    huge = 4 * 2**40  # 4 TiB of backup data
    part = bucket._transfers(huge).multipart_chunksize
    assert part * MAX_PARTS >= huge
    assert bucket._transfers(huge).max_in_memory_upload_chunks == 6
