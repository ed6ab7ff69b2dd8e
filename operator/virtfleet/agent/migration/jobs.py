"""One migration job running in this process: the guest, its pure state, its waiters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from virtfleet.hypervisor import Guest
from virtfleet.logs import get_logger
from virtfleet.reconcile.migration_job import JobState

log = get_logger("virtfleet.agent.migration")


@dataclass
class RunningJob:
    """Everything kept per job; dropped as a whole when the job ends (nothing outlives it)."""

    guest: Guest
    state: JobState = field(default_factory=JobState)
    #: Set when the job ended: a cancel() from the deletion handler waits for it.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    #: The VM's ``Migrating`` status write, started with the job.
    marking: asyncio.Task[None] | None = None
    #: A cancel() is waiting for ``ended`` (bookkeeping only).
    waited: bool = False

    async def marked(self) -> None:
        """Wait for the VM's ``Migrating`` write: no later VM write may land before it."""
        task, self.marking = self.marking, None
        if task is None:
            return
        try:
            await task
        except Exception as exc:  # best effort: the job goes on
            log.warning("the VM's Migrating status was not written", error=str(exc))
