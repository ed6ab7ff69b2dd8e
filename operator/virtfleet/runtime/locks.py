"""asyncio locks by key that exist only while someone holds or awaits them.

Operators take a lock per object (a VM's domain, an Event being aggregated) and see
thousands of objects come and go: a plain ``dict`` of locks grows by one entry per
object ever seen. Here an entry counts its holders and waiters and goes with the last.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    """Holders and waiters: the entry goes when the last of them leaves."""


class KeyedLocks(Generic[K]):
    """One asyncio lock per key, dropped as soon as nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[K, _Entry] = {}

    def __len__(self) -> int:
        """Keys whose lock is held or awaited right now."""
        return len(self._locks)

    def busy(self, key: K) -> bool:
        """Whether someone holds or awaits the key's lock (taking it now would wait)."""
        return key in self._locks

    @contextlib.asynccontextmanager
    async def lock(self, key: K) -> AsyncIterator[None]:
        """Hold the key's lock for the ``async with`` block (waiting for it first)."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0 and self._locks.get(key) is entry:
                del self._locks[key]
