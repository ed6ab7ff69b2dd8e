"""Handing each domain event to every subscriber, on the asyncio loop.

Queues from :meth:`EventFanout.subscribe` get every event (a full bounded queue drops it:
events are hints, the periodic resync repairs what was missed); callbacks from
:meth:`EventFanout.on_event` run as tasks, and their failures are logged, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from virtfleet.hypervisor.events import DomainEvent

__all__ = ["EventCallback", "EventFanout"]

_log = logging.getLogger(__name__)

EventCallback = Callable[[DomainEvent], Awaitable[None]]


class EventFanout:
    """The subscribers of one :class:`~virtfleet.hypervisor.connection.Hypervisor`."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[DomainEvent]] = []
        self._callbacks: list[EventCallback] = []
        self._running: set[asyncio.Task[None]] = set()
        #: Events dropped because a bounded subscriber queue was full.
        self.dropped = 0

    def subscribe(self, maxsize: int = 0) -> asyncio.Queue[DomainEvent]:
        """A new queue receiving every event from now on (``maxsize`` 0 = unbounded)."""
        queue: asyncio.Queue[DomainEvent] = asyncio.Queue(maxsize)
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[DomainEvent]) -> None:
        """Stop delivering to ``queue`` (a queue not subscribed is left alone)."""
        if queue in self._queues:
            self._queues.remove(queue)

    def on_event(self, callback: EventCallback) -> None:
        """Run ``await callback(event)`` as a task for every event."""
        self._callbacks.append(callback)

    def dispatch(self, event: DomainEvent) -> None:
        """Loop thread: fan out one event to queues and callbacks."""
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1
        for callback in list(self._callbacks):
            task = asyncio.get_running_loop().create_task(_run_callback(callback, event))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def cancel_callbacks(self) -> None:
        """Cancel the callback tasks still running (the connection is closing)."""
        for task in list(self._running):
            task.cancel()


async def _run_callback(callback: EventCallback, event: DomainEvent) -> None:
    try:
        await callback(event)
    except Exception:
        _log.exception("event callback %r failed for %s", callback, event)
