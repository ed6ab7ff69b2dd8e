"""Running blocking libvirt calls off the asyncio event loop.

Every libvirt call is a blocking RPC to libvirtd (seconds for ``create``, minutes for a
migration). kopf runs all handlers on one event loop, so a blocking call there freezes
watches, timers and liveness. libvirt-python releases the GIL inside its C calls, so
threads give real concurrency here.

Two pools, because one long job per slot would otherwise starve quick lookups: ``run``
for short calls (lookups, state, define), ``run_long`` for jobs measured in seconds or
more (start, snapshot, revert, migrate). Both translate ``libvirtError`` into
:mod:`virtfleet.hypervisor.errors` at this single boundary.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from virtfleet.hypervisor import errors

P = ParamSpec("P")
T = TypeVar("T")


class Executors:
    """A short-call pool and a long-job pool, with named threads (``<prefix>_N``).

    Thread names show up in ``py-spy dump`` and in logs, which is where one looks when a
    call to libvirtd hangs.
    """

    def __init__(self, workers: int, long_workers: int, name_prefix: str = "libvirt") -> None:
        if workers < 1 or long_workers < 1:
            raise ValueError("executor sizes must be >= 1")
        self._short = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name_prefix)
        self._long = ThreadPoolExecutor(
            max_workers=long_workers, thread_name_prefix=f"{name_prefix}-long"
        )
        self._closed = False
        #: Told ``(pool, operation, seconds)`` after every call (metrics); None: nobody.
        self.observer: Callable[[str, str, float], None] | None = None

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a short blocking call in the short pool; libvirt errors come out translated."""
        return await self._timed("short", self._short, fn, *args, **kwargs)

    async def run_long(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a long job (start, snapshot, revert, migrate) in its own small pool."""
        return await self._timed("long", self._long, fn, *args, **kwargs)

    async def _timed(
        self,
        name: str,
        pool: ThreadPoolExecutor,
        fn: Callable[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self.observer is None:
            return await self._submit(pool, fn, *args, **kwargs)
        started = time.perf_counter()
        try:
            return await self._submit(pool, fn, *args, **kwargs)
        finally:
            self.observer(name, operation_name(fn), time.perf_counter() - started)

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop accepting work; with ``wait`` block until running calls return."""
        self._closed = True
        self._short.shutdown(wait=wait, cancel_futures=True)
        self._long.shutdown(wait=wait, cancel_futures=True)

    async def _submit(
        self, pool: ThreadPoolExecutor, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        if self._closed:
            # A Guest outliving its Hypervisor: same meaning as a dead connection.
            raise errors.ConnectionLost("hypervisor is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        except errors.HypervisorError:
            raise
        except Exception as exc:
            if errors.is_libvirt_error(exc):
                raise errors.translate(exc) from exc
            raise


def operation_name(fn: Callable[..., object]) -> str:
    """Where a call comes from, as a bounded label: ``snapshots.get.<lambda>``,
    ``guest.Guest.shutdown.call``, ``virDomain.destroy``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    qualname = getattr(fn, "__qualname__", type(fn).__name__).replace(".<locals>", "")
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("virtfleet."):
        return f"{module.rsplit('.', 1)[-1]}.{qualname}"
    return qualname
