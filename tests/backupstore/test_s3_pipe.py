"""The bucket module's pure parts: key layout, the reader→uploader pipe, the rate limit.

No network: ``ChunkPipe`` is exercised with two real threads, ``_Throttle`` with a fake clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.backupstore import s3
from virtfleet.backupstore.s3 import ChunkPipe, StoreError, _Throttle, backup_prefix

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


# --- _Throttle -------------------------------------------------------------------------------


class FakeClock:
    """Stands in for the module's ``time``: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(s3, "time", fake)
    return fake


def test_no_rate_never_sleeps(clock: FakeClock) -> None:
    """Without a bandwidth limit the upload runs at full speed."""
    throttle = _Throttle(None)
    for _ in range(5):
        throttle.pass_bytes(10**12)
    assert clock.sleeps == []


def test_a_rate_sleeps_just_enough(clock: FakeClock) -> None:
    """250 bytes at 100 B/s take 2.5 s; time already spent is not slept again."""
    throttle = _Throttle(100)
    throttle.pass_bytes(250)
    assert clock.sleeps == [pytest.approx(2.5)]
    clock.now += 10.0  # the uploader was slow on its own
    throttle.pass_bytes(100)
    assert clock.sleeps == [pytest.approx(2.5)]


@given(
    rate=st.integers(1, 10**6),
    steps=st.lists(st.tuples(st.integers(0, 10**6), st.floats(0, 5)), max_size=20),
)
def test_the_rate_is_never_exceeded(rate: int, steps: list[tuple[int, float]]) -> None:
    """After every pass, the time elapsed covers the bytes passed at ``rate``."""
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3, "time", clock)
        throttle = _Throttle(rate)
        start, sent = clock.now, 0
        for count, busy in steps:
            clock.now += busy
            throttle.pass_bytes(count)
            sent += count
            assert clock.now - start >= sent / rate - 1e-6
