"""libvirt's event loop, run in one daemon thread per process.

libvirt needs an event loop implementation registered *before* the first connection is
opened, or keepalive, close callbacks and domain events never fire. Two choices exist:

* ``libvirtaio.virEventRegisterAsyncIOImpl()`` runs libvirt's handles and timers on the
  asyncio loop. It binds the process, once, to *that* loop: a second loop (pytest's
  loop per test, a kopf restart in-process, ``asyncio.run`` in a CLI sub-command) then
  drives nothing. And keepalive timers only fire while the asyncio loop is responsive,
  so a handler that blocks the loop for 15 s makes libvirt declare a healthy daemon dead.
* ``virEventRegisterDefaultImpl()`` plus a thread looping ``virEventRunDefaultImpl()``
  (the pattern OpenStack Nova's ``host.py`` uses with green threads). Keepalive is
  independent of asyncio's health, and any number of loops can consume events, because
  each :class:`~virtfleet.hypervisor.connection.Hypervisor` forwards them into *its* loop
  with ``loop.call_soon_threadsafe``.

We use the second. The cost is one thread, and the rule that callbacks running in it
must be quick and must not call back into the connection that is dispatching (they only
decode integers and hand over to asyncio). Do not also register libvirtaio in the same
process: libvirt accepts one implementation per process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import libvirt

__all__ = ["ensure_running", "is_running"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_registered = False
_thread: threading.Thread | None = None

#: Pause after an error from the loop iteration, so a persistent failure cannot spin.
_ERROR_PAUSE_SECONDS = 0.5


def _ignore_libvirt_error(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions instead."""


def _run_forever() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # keep the loop alive whatever one iteration did
            _log.exception("libvirt event loop iteration failed")
            time.sleep(_ERROR_PAUSE_SECONDS)


def ensure_running() -> None:
    """Register the default event implementation (once) and start its thread (once).

    Idempotent and thread-safe; call it before opening any connection.
    """
    global _registered, _thread
    with _lock:
        if not _registered:
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            libvirt.virEventRegisterDefaultImpl()
            _registered = True
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run_forever, name="libvirt-events", daemon=True)
            _thread.start()


def is_running() -> bool:
    """Whether the event thread is alive (for health checks)."""
    return _thread is not None and _thread.is_alive()
