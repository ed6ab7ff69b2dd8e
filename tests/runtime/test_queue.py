"""WorkQueue: dedupe, per-key serialisation, delays, backoff, concurrency, stop."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from virtfleet.runtime.queue import Backoff, WorkQueue

Handler = Callable[[str], Awaitable[float | None]]


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., WorkQueue[str]]]:
    """Start queues with a handler; stop them all at the end."""
    started: list[tuple[WorkQueue[str], asyncio.Task[None]]] = []

    def start(handler: Handler, **kwargs: object) -> WorkQueue[str]:
        queue: WorkQueue[str] = WorkQueue(**kwargs)  # type: ignore[arg-type]
        started.append((queue, asyncio.create_task(queue.run(handler))))
        return queue

    yield start
    for queue, task in started:
        await queue.stop(grace=0.5)
        await asyncio.wait_for(task, 2)


async def test_keys_run_in_order_added(running: Callable[..., WorkQueue[str]]) -> None:
    seen: list[str] = []

    async def handler(key: str) -> None:
        seen.append(key)

    queue = running(handler, workers=1)
    for key in "abc":
        queue.add(key)
    await settle()
    assert seen == ["a", "b", "c"]


async def test_keys_added_before_run_are_processed() -> None:
    seen: list[str] = []

    async def handler(key: str) -> None:
        seen.append(key)

    queue: WorkQueue[str] = WorkQueue(workers=2)
    queue.add("early")
    task = asyncio.create_task(queue.run(handler))
    await settle()
    await queue.stop()
    await task
    assert seen == ["early"]


async def test_a_key_added_many_times_runs_once(running: Callable[..., WorkQueue[str]]) -> None:
    seen: list[str] = []
    gate = asyncio.Event()

    async def handler(key: str) -> None:
        seen.append(key)
        await gate.wait()

    queue = running(handler, workers=1)
    queue.add("blocker")
    await settle(0.01)
    for _ in range(10):
        queue.add("x")
    assert len(queue) == 1
    gate.set()
    await settle()
    assert seen == ["blocker", "x"]


async def test_one_key_never_runs_twice_at_once_and_reruns_after(
    running: Callable[..., WorkQueue[str]],
) -> None:
    active = 0
    peak = 0
    runs = 0
    release = asyncio.Event()

    async def handler(key: str) -> None:
        nonlocal active, peak, runs
        active += 1
        peak = max(peak, active)
        runs += 1
        if runs == 1:
            await release.wait()
        active -= 1

    queue = running(handler, workers=4)
    queue.add("k")
    await settle(0.01)
    queue.add("k")  # while running: must wait, then run again
    queue.add("k")  # and only once more
    await settle(0.02)
    assert runs == 1
    release.set()
    await settle()
    assert runs == 2
    assert peak == 1


async def test_concurrency_is_bounded(running: Callable[..., WorkQueue[str]]) -> None:
    active = 0
    peak = 0

    async def handler(key: str) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1

    queue = running(handler, workers=3)
    for i in range(12):
        queue.add(str(i))
    await settle(0.2)
    assert peak == 3


async def test_add_after_delays_and_the_earliest_wins(
    running: Callable[..., WorkQueue[str]],
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[tuple[str, float]] = []

    async def handler(key: str) -> None:
        seen.append((key, loop.time() - start))

    queue = running(handler, workers=1)
    queue.add_after("late", 0.3)
    queue.add_after("late", 0.1)  # earlier: replaces
    queue.add_after("late", 0.5)  # later: ignored
    queue.add_after("now", 0)
    assert queue.delayed == 1
    await settle(0.05)
    assert [k for k, _ in seen] == ["now"]
    await settle(0.15)
    assert [k for k, _ in seen] == ["now", "late"]
    assert 0.09 <= seen[1][1] < 0.3
    await settle(0.5)
    assert [k for k, _ in seen] == ["now", "late"]  # the replaced timers never fire


async def test_handler_result_requeues_after(running: Callable[..., WorkQueue[str]]) -> None:
    runs = 0

    async def handler(key: str) -> float | None:
        nonlocal runs
        runs += 1
        return 0.05 if runs < 3 else None

    queue = running(handler, workers=1)
    queue.add("k")
    await settle(0.3)
    assert runs == 3


async def test_failures_back_off_exponentially_and_reset_on_success(
    running: Callable[..., WorkQueue[str]],
) -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def handler(key: str) -> None:
        times.append(loop.time())
        if len(times) <= 3:
            raise RuntimeError("boom")

    queue = running(handler, workers=1, backoff=Backoff(base=0.04, cap=1.0))
    queue.add("k")
    await settle(0.5)
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.035
    assert gaps[1] >= 0.075
    assert gaps[2] >= 0.155
    assert queue.failures("k") == 0


async def test_a_failure_is_reported_to_the_hook_and_still_backs_off(
    running: Callable[..., WorkQueue[str]],
) -> None:
    """An unexpected error must reach the object (via the hook), not only the log."""
    runs: list[str] = []
    reported: list[tuple[str, str]] = []

    async def handler(key: str) -> None:
        runs.append(key)
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    async def hook(key: str, exc: Exception) -> None:
        reported.append((key, type(exc).__name__))

    queue = running(handler, workers=1, backoff=Backoff(base=10, cap=10), on_error=hook)
    queue.add("k")
    await settle()
    assert reported == [("k", "UnicodeDecodeError")]
    assert queue.failures("k") == 1
    assert queue.delayed == 1  # retried after the backoff, not at once
    assert runs == ["k"]


async def test_a_failing_hook_does_not_stop_the_retry(
    running: Callable[..., WorkQueue[str]],
) -> None:
    runs: list[str] = []

    async def handler(key: str) -> None:
        runs.append(key)
        if len(runs) == 1:
            raise RuntimeError("boom")

    async def hook(key: str, exc: Exception) -> None:
        raise ConnectionError("the apiserver is away too")

    queue = running(handler, workers=1, backoff=Backoff(base=0.02, cap=0.02), on_error=hook)
    queue.add("k")
    await settle(0.2)
    assert runs == ["k", "k"]
    assert queue.failures("k") == 0


def test_backoff_is_capped() -> None:
    backoff = Backoff(base=1, cap=10)
    assert [backoff.delay(n) for n in range(6)] == [0, 1, 2, 4, 8, 10]
    assert backoff.delay(10_000) == 10


async def test_a_failing_key_does_not_block_others(
    running: Callable[..., WorkQueue[str]],
) -> None:
    seen: list[str] = []

    async def handler(key: str) -> None:
        seen.append(key)
        if key == "bad":
            raise ValueError("always")

    queue = running(handler, workers=1, backoff=Backoff(base=10, cap=10))
    queue.add("bad")
    queue.add("good")
    await settle()
    assert seen == ["bad", "good"]
    assert queue.failures("bad") == 1


async def test_forget_drops_pending_timers_and_history(
    running: Callable[..., WorkQueue[str]],
) -> None:
    seen: list[str] = []

    async def handler(key: str) -> None:
        seen.append(key)

    queue = running(handler, workers=1)
    queue.add_after("k", 0.05)
    queue.forget("k")
    await settle(0.1)
    assert seen == []


async def test_stop_lets_running_handlers_finish_and_drops_the_rest() -> None:
    finished: list[str] = []

    async def handler(key: str) -> None:
        await asyncio.sleep(0.05)
        finished.append(key)

    queue: WorkQueue[str] = WorkQueue(workers=1)
    task = asyncio.create_task(queue.run(handler))
    queue.add("a")
    queue.add("b")
    queue.add_after("c", 0.01)
    await settle(0.01)
    await queue.stop(grace=1)
    await asyncio.wait_for(task, 1)
    assert finished == ["a"]
    queue.add("d")  # ignored after stop
    assert len(queue) == 0


async def test_stop_cancels_handlers_that_outlive_the_grace() -> None:
    cancelled = asyncio.Event()

    async def handler(key: str) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    queue: WorkQueue[str] = WorkQueue(workers=1)
    task = asyncio.create_task(queue.run(handler))
    queue.add("slow")
    await settle(0.01)
    await queue.stop(grace=0.05)
    await asyncio.wait_for(task, 1)
    assert cancelled.is_set()


async def test_running_twice_is_refused() -> None:
    async def handler(key: str) -> None:
        return None

    queue: WorkQueue[str] = WorkQueue(workers=1)
    task = asyncio.create_task(queue.run(handler))
    await settle(0.01)
    with pytest.raises(RuntimeError, match="already running"):
        await queue.run(handler)
    await queue.stop()
    await task


def test_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="worker"):
        WorkQueue(workers=0)
