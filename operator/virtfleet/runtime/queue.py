"""An asyncio work queue of keys, in the spirit of client-go's rate-limited workqueue.

Watch events, timers and periodic passes only *enqueue a key*; one reconcile function
then reads the latest state and converges (DESIGN §3.2, §6: event handlers are not
retried). The queue guarantees what level-triggered reconciliation needs:

* de-duplication: a key added many times before it runs, runs once;
* per-key serialisation: two workers never hold one key; a key added while it runs
  runs again right after (so no change is lost);
* delayed requeue (``add_after``), where the earliest pending time wins;
* per-key exponential backoff after a failure, reset by a success, and an optional
  ``on_error`` hook that tells the object's owner (a condition, an Event) — an error
  nobody anticipated must not leave the object silent while it is retried;
* bounded concurrency (``workers``) and a graceful ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from virtfleet.logs import get_logger

K = TypeVar("K", bound=Hashable)

#: A handler reconciles one key; returning a number asks for another pass that many
#: seconds later (controller-runtime's ``RequeueAfter``), ``None`` means done.
Handler = Callable[[K], Awaitable[float | None]]
#: Told about a handler's unexpected exception before the key is retried with backoff.
ErrorHook = Callable[[K, Exception], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    """Per-key retry delays after failures: ``base * 2**(failures-1)``, capped."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return float(min(self.cap, self.base * 2 ** min(failures - 1, 62)))


class WorkQueue(Generic[K]):
    """A de-duplicating, per-key serialised asyncio work queue (see the module doc)."""

    def __init__(
        self,
        *,
        name: str = "queue",
        workers: int = 4,
        backoff: Backoff | None = None,
        on_error: ErrorHook[K] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a work queue needs at least one worker")
        self.name = name
        self.workers = workers
        self.backoff = backoff or Backoff()
        self.on_error = on_error
        self._log = get_logger("virtfleet.runtime.queue", queue=name)
        self._ready: asyncio.Queue[K] | None = None
        self._dirty: set[K] = set()  # waiting to run (at most once each)
        self._processing: set[K] = set()  # held by a worker right now
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._closing = False
        self._running = False
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._pending_start: list[K] = []

    # --- producer side -------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue ``key`` to run as soon as a worker is free (no-op if already waiting)."""
        if self._closing or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # re-queued by its worker when the current run ends
        self._push(key)

    def add_after(self, key: K, seconds: float) -> None:
        """Queue ``key`` after ``seconds``; an earlier pending time for the key wins."""
        if self._closing:
            return
        if seconds <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        handle = loop.call_at(due, self._fire, key)
        self._timers[key] = (due, handle)

    def failures(self, key: K) -> int:
        """Consecutive failures of ``key`` (0 after a success)."""
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """Drop the key's backoff history and pending timer (e.g. the object is gone)."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()

    def __len__(self) -> int:
        """Keys waiting to run now (not counting delayed ones or running ones)."""
        return len(self._dirty - self._processing)

    @property
    def delayed(self) -> int:
        return len(self._timers)

    @property
    def tracked(self) -> int:
        """Keys the queue holds any state for (waiting, running, delayed, backing off)."""
        return len(self._dirty | self._processing | self._timers.keys() | self._failures.keys())

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _push(self, key: K) -> None:
        if self._ready is None:
            self._pending_start.append(key)
        else:
            self._ready.put_nowait(key)

    # --- consumer side -------------------------------------------------------------

    async def run(self, handler: Handler[K]) -> None:
        """Process keys with ``workers`` concurrent workers until :meth:`stop`."""
        if self._running:
            raise RuntimeError(f"work queue {self.name} is already running")
        self._running = True
        self._ready = asyncio.Queue()
        for key in self._pending_start:
            self._ready.put_nowait(key)
        self._pending_start.clear()
        self._tasks = [
            asyncio.create_task(self._worker(handler), name=f"{self.name}-worker-{i}")
            for i in range(self.workers)
        ]
        try:
            # Workers end by stop() (cancelled when idle): that is a normal return.
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._running = False

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking keys; let running handlers finish for ``grace`` seconds, then cancel."""
        self._closing = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in self._tasks:
            if task not in self._busy:
                task.cancel()
        busy = [t for t in self._tasks if t in self._busy]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace)
            for task in late:
                self._log.warning("cancelling a handler that outlived the stop grace period")
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._dirty.clear()  # dropped: level-triggered work is redone after a restart

    async def _worker(self, handler: Handler[K]) -> None:
        assert self._ready is not None
        me = asyncio.current_task()
        assert me is not None
        while not self._closing:
            key = await self._ready.get()
            self._busy.add(me)
            self._dirty.discard(key)
            self._processing.add(key)
            try:
                await self._handle(handler, key)
            finally:
                self._processing.discard(key)
                self._busy.discard(me)
                if key in self._dirty and not self._closing:
                    self._ready.put_nowait(key)

    async def _handle(self, handler: Handler[K], key: K) -> None:
        try:
            requeue_after = await handler(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = self.backoff.delay(failures)
            self._log.exception(
                "reconcile failed; retrying", key=_printable(key), failures=failures, retry_in=delay
            )
            await self._report(key, exc)
            with contextlib.suppress(RuntimeError):  # loop closing
                self.add_after(key, delay)
            return
        self._failures.pop(key, None)
        if requeue_after is not None:
            self.add_after(key, requeue_after)

    async def _report(self, key: K, exc: Exception) -> None:
        """Run the ``on_error`` hook; its own failure is logged, the retry happens anyway."""
        if self.on_error is None:
            return
        try:
            await self.on_error(key, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("could not report a failed reconcile", key=_printable(key))


def _printable(key: object) -> str:
    if isinstance(key, tuple):
        return "/".join(str(part) for part in key if part is not None)
    return str(key)
