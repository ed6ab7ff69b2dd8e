"""One lock per VM, shared by every loop of the agent that acts on the VM's domain.

The VM loop, the snapshot and restore loops and a migration job each hold the VM's
lock while they touch its domain, so none of them "heals" what another is in the
middle of. A lock exists only while it is held or awaited (:class:`KeyedLocks`): the
agent sees thousands of VMs come and go, and the locks were once kept for every VM
the node ever had.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from virtfleet.identity import Key
from virtfleet.runtime.locks import KeyedLocks

Handler = Callable[[Key], Awaitable[float | None]]


class VmLocks(KeyedLocks[Key]):
    """Per-VM locks (see the module doc)."""

    def guard(self, handler: Handler) -> Handler:
        """``handler`` run under the key's lock (wraps the VM loop's reconcile)."""

        async def run(key: Key) -> float | None:
            async with self.lock(key):
                return await handler(key)

        return run
