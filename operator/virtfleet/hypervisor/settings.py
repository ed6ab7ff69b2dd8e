"""How the process reaches and watches libvirtd, and the back-off between reconnects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["HypervisorSettings", "backoff_delays"]


@dataclass(frozen=True, slots=True)
class HypervisorSettings:
    """How to reach and watch libvirtd.

    ``uri``: libvirt URI (``qemu:///system``, ``qemu+tcp://127.0.0.1:16510/system``,
    ``test:///abs/path/node.xml`` for tests).
    ``readonly``: open read-only (observers, ``VMHost`` reporters).
    ``keepalive_interval``/``keepalive_count``: libvirt pings every ``interval`` seconds
    and declares the peer dead after ``count`` unanswered pings (5 x 3 = 15-20 s);
    ``keepalive_count=0`` disables keepalive.
    ``reconnect_backoff_initial``/``_max``/``_factor``: delays between reconnect
    attempts grow by ``factor`` from ``initial`` up to ``max`` seconds.
    ``executor_workers``: threads for short calls. ``long_executor_workers``: threads for
    long jobs (start, snapshot, revert, migrate), kept small and separate so those jobs
    cannot starve lookups.
    ``thread_name_prefix``: name of worker threads (seen in thread dumps).
    ``reboot_events``/``job_events``: also subscribe to REBOOT / JOB_COMPLETED events.
    """

    uri: str = "qemu:///system"
    readonly: bool = False
    keepalive_interval: int = 5
    keepalive_count: int = 3
    reconnect_backoff_initial: float = 0.5
    reconnect_backoff_max: float = 30.0
    reconnect_backoff_factor: float = 2.0
    executor_workers: int = 8
    long_executor_workers: int = 2
    thread_name_prefix: str = "libvirt"
    reboot_events: bool = True
    job_events: bool = True

    def __post_init__(self) -> None:
        if self.keepalive_interval < 1 or self.keepalive_count < 0:
            raise ValueError("keepalive_interval must be >= 1 and keepalive_count >= 0")
        if not 0 < self.reconnect_backoff_initial <= self.reconnect_backoff_max:
            raise ValueError("need 0 < reconnect_backoff_initial <= reconnect_backoff_max")
        if self.reconnect_backoff_factor < 1:
            raise ValueError("reconnect_backoff_factor must be >= 1")
        if self.executor_workers < 1 or self.long_executor_workers < 1:
            raise ValueError("executor sizes must be >= 1")


def backoff_delays(initial: float, maximum: float, factor: float = 2.0) -> Iterator[float]:
    """``initial, initial*factor, ...`` capped at ``maximum``, forever."""
    delay = initial
    while True:
        yield min(delay, maximum)
        delay = min(delay * factor, maximum)
