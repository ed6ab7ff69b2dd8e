"""A guest's serial console as an asyncio byte stream (``virDomainOpenConsole``).

libvirt relays the console's pty over the connection the agent already has (also to a
remote libvirtd), so nothing on the node is opened by path. The stream is non-blocking:
libvirt's event thread (:mod:`virtfleet.hypervisor.eventloop`) calls back when the guest
wrote something, the callback only reads what is there and hands it to asyncio; writes
and the close go through the executor like every libvirt call.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Final

import libvirt

from virtfleet.hypervisor import errors
from virtfleet.hypervisor.guest import Guest
from virtfleet.logs import get_logger

__all__ = ["ConsoleStream", "open_console"]

_log = get_logger("virtfleet.hypervisor.console")

#: Bytes asked of libvirt per read.
CHUNK: Final = 16 * 1024
#: Chunks of guest output held for a slow reader; more is dropped (and counted), so a
#: guest flooding its console cannot grow the agent's memory.
MAX_PENDING: Final = 1024
_EAGAIN: Final = -2
#: Closes of consoles whose opener left, kept until done (asyncio holds tasks weakly).
_closing: set[asyncio.Future[None]] = set()
_EVENTS: Final = (
    libvirt.VIR_STREAM_EVENT_READABLE
    | libvirt.VIR_STREAM_EVENT_ERROR
    | libvirt.VIR_STREAM_EVENT_HANGUP
)


class ConsoleStream:
    """One open console: :meth:`read` until ``b""`` (the guest or libvirt closed it)."""

    def __init__(self, guest: Guest, stream: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._guest = guest
        self._stream = stream
        self._loop = loop
        self._output: asyncio.Queue[bytes] = asyncio.Queue()
        self._ended = threading.Event()
        self._closed = False
        self.dropped = 0

    # Runs in libvirt's event thread: read what is there, hand it over, never block.
    def _on_event(self, stream: Any, events: int, _opaque: object) -> None:
        if self._ended.is_set():
            return
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = stream.recv(CHUNK)
                except libvirt.libvirtError as exc:
                    _log.info("console stream ended", error=str(exc.get_error_message()))
                    self._end()
                    return
                if data == _EAGAIN:
                    break
                if not data:
                    self._end()
                    return
                self._loop.call_soon_threadsafe(self._deliver, bytes(data))
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._end()

    def _end(self) -> None:
        self._ended.set()
        try:
            # No more callbacks: a remote stream at EOF would otherwise fire again and
            # again until close() runs.
            self._stream.eventUpdateCallback(0)
        except libvirt.libvirtError as exc:
            _log.debug("console callback not paused", error=str(exc.get_error_message()))
        self._loop.call_soon_threadsafe(self._output.put_nowait, b"")

    def _deliver(self, data: bytes) -> None:
        if self._output.qsize() >= MAX_PENDING:
            self.dropped += len(data)
            return
        self._output.put_nowait(data)

    async def read(self) -> bytes:
        """The guest's next output; ``b""`` once the console is gone."""
        if self._closed:
            return b""
        data = await self._output.get()
        if not data:
            self._output.put_nowait(b"")  # every later read also says "ended"
        return data

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the console (waits while libvirt's buffer is full)."""
        view = memoryview(data)
        while view and not self._ended.is_set():
            sent = await self._guest.executors.run(self._stream.send, bytes(view))
            if sent == _EAGAIN:
                await asyncio.sleep(0.01)
                continue
            view = view[int(sent) :]

    async def close(self) -> None:
        """Stop the callbacks and end the stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._ended.set()
        stream = self._stream

        def finish() -> None:
            try:
                stream.eventRemoveCallback()
            except libvirt.libvirtError as exc:
                _log.debug("console callback already gone", error=str(exc.get_error_message()))
            try:
                stream.abort()
            except libvirt.libvirtError as exc:
                _log.debug("console stream already ended", error=str(exc.get_error_message()))

        try:
            await self._guest.executors.run(finish)
        except errors.HypervisorError as exc:
            _log.info("console stream not closed cleanly", error=str(exc))
        # libvirt-python keeps the callback (this object) on the stream: break the cycle.
        if hasattr(stream, "cb"):
            del stream.cb


async def open_console(guest: Guest) -> ConsoleStream:
    """Attach to the guest's serial console, taking it over from another session (like
    ``virsh console --force``: the newest client wins, a forgotten one cannot lock a
    user out).

    Raises :class:`~virtfleet.hypervisor.errors.HypervisorError` when the domain is not
    running or its serial port is not a pty (a domain defined before virtfleet made it
    one, until it is defined again).
    """
    loop = asyncio.get_running_loop()
    dom = guest.handle

    def attach() -> ConsoleStream:
        stream = dom.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            console = ConsoleStream(guest, stream, loop)
            stream.eventAddCallback(_EVENTS, console._on_event, None)
        except libvirt.libvirtError:
            try:
                stream.abort()
            except libvirt.libvirtError as exc:
                _log.debug("unopened console stream", error=str(exc.get_error_message()))
            raise
        return console

    opening = asyncio.ensure_future(guest.executors.run(attach))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The caller left while libvirt attached: close what it attached, or it would hold
        # the console until the agent stops.
        def close_late(done: asyncio.Future[ConsoleStream]) -> None:
            if not done.cancelled() and done.exception() is None:
                closing = asyncio.ensure_future(done.result().close())
                _closing.add(closing)
                closing.add_done_callback(_closing.discard)

        opening.add_done_callback(close_late)
        raise
