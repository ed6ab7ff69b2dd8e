"""A netlink socket in another network namespace, made by this thread.

pyroute2's own ``IPRoute(netns=...)`` forks a child to make the socket: in the agent (an
asyncio program with threads, kopf's signal handlers) a fork copies all of that, and the
copy's shutdown took the agent down. ``setns`` on the calling thread alone does the same
without a process: a socket keeps the namespace it was made in.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from pyroute2 import IPRoute

__all__ = ["entered", "iproute"]

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """This thread in the namespace at path ``netns`` for the block (None: stays home).

    What it opens meanwhile belongs to that namespace: sockets, ``/proc/sys/net`` files.
    """
    if netns is None:
        yield
        return
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns, "rb") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


@contextmanager
def iproute(netns: str | None = None) -> Iterator[Any]:
    """An ``IPRoute`` on the namespace at path ``netns`` (None: this thread's own)."""
    with entered(netns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()
