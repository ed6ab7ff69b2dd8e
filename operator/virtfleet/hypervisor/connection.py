"""The process's one long-lived libvirt connection (modelled on OpenStack Nova's ``host.py``).

What it adds over ``libvirt.open``:

* blocking calls run in named thread pools (:mod:`.executor`), never on the event loop;
* keepalive (``setKeepAlive``) so a hung libvirtd is noticed, and a close callback that
  reconnects with capped exponential backoff;
* domain events delivered into asyncio, as :class:`~.events.DomainEvent` values, to
  queues from :meth:`Hypervisor.subscribe` and to callbacks from :meth:`Hypervisor.on_event`;
* :meth:`Hypervisor.on_reconnect` hooks run after *every* successful connection. Events
  are lost while disconnected, so the caller must resync from scratch in that hook.

Threads: libvirt callbacks run on the libvirt event thread (:mod:`.eventloop`); they only
decode and hand over with ``call_soon_threadsafe``. Connection state (``_conn``, the
reconnect task) is only mutated on the asyncio loop that called :meth:`Hypervisor.open`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from virtfleet.domain.jobs import parse_job_stats
from virtfleet.hypervisor import errors, eventloop
from virtfleet.hypervisor.bridgeports import BridgePort, bridge_ports
from virtfleet.hypervisor.events import DomainEvent, EventKind, lifecycle_event
from virtfleet.hypervisor.executor import Executors
from virtfleet.hypervisor.fanout import EventCallback, EventFanout
from virtfleet.hypervisor.guest import Guest, OwnedGuest, StopOutcome, graceful_stop
from virtfleet.hypervisor.hostinfo import HostFacts, libvirt_version, read_host_facts
from virtfleet.hypervisor.owned import owned_domains
from virtfleet.hypervisor.schema import check_domain_xml
from virtfleet.hypervisor.settings import HypervisorSettings, backoff_delays
from virtfleet.hypervisor.stats import DomainStats, all_domain_stats
from virtfleet.identity import METADATA_ELEMENT, METADATA_NAMESPACE

__all__ = ["Hypervisor"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

ReconnectHook = Callable[[bool], Awaitable[None]]


def _default_connect(uri: str, readonly: bool) -> Any:
    return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)


@dataclass(slots=True)
class _Registration:
    """What was registered on one connection, to undo it when that connection goes."""

    conn: Any
    callback_ids: list[int]


class Hypervisor:
    """One long-lived libvirt connection with events, keepalive and reconnect.

    ``connect`` replaces ``libvirt.open``/``openReadOnly`` (tests inject failures with it).
    """

    def __init__(
        self,
        settings: HypervisorSettings | None = None,
        *,
        connect: Callable[[str, bool], Any] | None = None,
    ) -> None:
        self.settings = settings or HypervisorSettings()
        self._connect = connect or _default_connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ex: Executors | None = None
        self._observer: Callable[[str, str, float], None] | None = None
        self._reg: _Registration | None = None
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._hooks: list[ReconnectHook] = []
        self._fanout = EventFanout()
        #: Incremented on every successful connection; Guests from older ones are stale.
        self.connection_generation = 0

    # ----------------------------------------------------------------- lifecycle

    @property
    def events_dropped(self) -> int:
        """Events dropped because a bounded subscriber queue was full."""
        return self._fanout.dropped

    @property
    def connected(self) -> bool:
        """A connection is open (it may still turn out dead at the next call)."""
        return self._reg is not None

    async def open(self) -> None:
        """Connect, register keepalive/close callback/events, then run the reconnect hooks.

        Must be awaited on the loop that will consume events. Raises if libvirtd is not
        reachable *now*; later losses are retried in the background.
        """
        if self._reg is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        eventloop.ensure_running()
        s = self.settings
        self._ex = Executors(s.executor_workers, s.long_executor_workers, s.thread_name_prefix)
        self._ex.observer = self._observer
        try:
            await self._connect_once()
        except BaseException:
            self._ex.shutdown(wait=False)
            self._ex = None
            raise
        await self._run_hooks(reconnect=False)

    async def close(self) -> None:
        """Stop reconnecting, deregister everything and close the connection. Idempotent."""
        self._closing = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fanout.cancel_callbacks()
        reg, self._reg = self._reg, None
        self._connected.clear()
        ex, self._ex = self._ex, None
        if ex is None:
            return
        if reg is not None:
            await ex.run(_dispose, reg)
        ex.shutdown(wait=True)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection is up (raises ``TimeoutError``)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def reconnect(self) -> None:
        """Drop the current connection and reconnect in the background (also used internally)."""
        self._connection_lost(self._reg.conn if self._reg else None, "requested")

    def on_reconnect(self, hook: ReconnectHook) -> None:
        """Run ``await hook(reconnect)`` after every successful connection.

        ``reconnect`` is False for the first one in :meth:`open`, True afterwards. Hooks run
        in registration order; an exception is logged and does not stop the others (the
        periodic resync will catch up).
        """
        self._hooks.append(hook)

    # ----------------------------------------------------------------- events

    def subscribe(self, maxsize: int = 0) -> asyncio.Queue[DomainEvent]:
        """A new queue receiving every event from now on (``maxsize`` 0 = unbounded).

        A full bounded queue drops the event (counted in ``events_dropped``): events are
        hints and the periodic resync repairs whatever was missed.
        """
        return self._fanout.subscribe(maxsize)

    def unsubscribe(self, queue: asyncio.Queue[DomainEvent]) -> None:
        """Stop delivering to ``queue``."""
        self._fanout.unsubscribe(queue)

    def on_event(self, callback: EventCallback) -> None:
        """Run ``await callback(event)`` as a task for every event (keep it short)."""
        self._fanout.on_event(callback)

    # ----------------------------------------------------------------- calls

    def _executors(self) -> Executors:
        if self._ex is None:
            raise errors.ConnectionLost("hypervisor is closed")
        return self._ex

    def _require_conn(self) -> Any:
        if self._reg is None:
            raise errors.ConnectionLost(f"not connected to {self.settings.uri}")
        return self._reg.conn

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(virConnect)`` in the short-call pool (for sibling modules)."""
        conn = self._require_conn()
        return await self._executors().run(fn, conn)

    async def call_long(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(virConnect)`` in the long-job pool (for sibling modules)."""
        conn = self._require_conn()
        return await self._executors().run_long(fn, conn)

    def guest(self, dom: Any) -> Guest:
        """Wrap a raw ``virDomain`` from this connection (for sibling modules)."""
        return Guest(dom, self._executors())

    # ----------------------------------------------------------------- domains

    async def define(self, xml: str) -> Guest:
        """Define (or redefine) a persistent domain, validating against libvirt's schema.

        The schema is checked here with the schema parsed once (:mod:`.schema`); only a
        host without the schema file asks libvirt (``VIR_DOMAIN_DEFINE_VALIDATE``), and
        falls back to no validation when the driver rejects that flag itself. A schema
        error raises :class:`~virtfleet.hypervisor.errors.InvalidDefinition`.
        """
        if check_domain_xml(xml):
            return self.guest(await self.call(lambda conn: conn.defineXMLFlags(xml, 0)))
        return self.guest(await self.call(lambda conn: _define_validated_by_libvirt(conn, xml)))

    async def lookup(self, uuid: str) -> Guest | None:
        """The domain with this UUID, or ``None``."""
        try:
            return self.guest(await self.call(lambda conn: conn.lookupByUUIDString(uuid)))
        except errors.NotFound:
            return None

    async def lookup_by_name(self, name: str) -> Guest | None:
        """The domain with this name, or ``None``."""
        try:
            return self.guest(await self.call(lambda conn: conn.lookupByName(name)))
        except errors.NotFound:
            return None

    async def list_owned(
        self, metadata_ns: str = METADATA_NAMESPACE, element: str = METADATA_ELEMENT
    ) -> list[OwnedGuest]:
        """Domains (active and inactive) carrying our ``<element>`` in namespace ``metadata_ns``.

        Everything else is foreign and never returned, so it can never be mutated or
        garbage-collected by mistake (DESIGN §3.3). One executor call for the whole scan.
        """
        found = await self.call(lambda conn: owned_domains(conn, metadata_ns, element))
        return [OwnedGuest(self.guest(dom), xml) for dom, xml in found]

    async def graceful_stop(
        self, guest: Guest, grace_seconds: float, *, poll_interval: float = 0.5
    ) -> StopOutcome:
        """See :func:`virtfleet.hypervisor.guest.graceful_stop`."""
        return await graceful_stop(guest, grace_seconds, poll_interval=poll_interval)

    async def host_facts(self) -> HostFacts:
        """Capacity and versions of this node."""
        return await self.call(read_host_facts)

    async def bridge_ports(self) -> list[BridgePort]:
        """The taps of running domains on host bridges (one executor call)."""
        return await self.call(bridge_ports)

    def observe_calls(self, observer: Callable[[str, str, float], None]) -> None:
        """Tell ``observer(pool, operation, seconds)`` of every libvirt call (metrics)."""
        self._observer = observer
        if self._ex is not None:
            self._ex.observer = observer

    async def domain_stats(self) -> list[DomainStats]:
        """Every running domain's counters, one libvirt call (for metrics)."""
        return await self.call(all_domain_stats)

    async def libvirt_version(self) -> int:
        """libvirtd's packed version over this connection (a liveness check)."""
        return await self.call(libvirt_version)

    # ----------------------------------------------------------------- internals

    async def _connect_once(self) -> None:
        reg = await self._executors().run(self._open_and_register)
        if self._closing:
            await self._executors().run(_dispose, reg)
            raise errors.ConnectionLost("hypervisor closed while connecting")
        self._reg = reg
        self.connection_generation += 1
        self._connected.set()
        _log.info("connected to %s (generation %d)", self.settings.uri, self.connection_generation)

    def _open_and_register(self) -> _Registration:
        """Worker thread: open and register everything, or close again on any failure."""
        s = self.settings
        conn = self._connect(s.uri, s.readonly)
        reg = _Registration(conn, [])
        try:
            if s.keepalive_count > 0:
                try:
                    conn.setKeepAlive(s.keepalive_interval, s.keepalive_count)
                except libvirt.libvirtError as exc:
                    # Local drivers (test:///, qemu:/// via embedded) have no keepalive.
                    if not isinstance(errors.translate(exc), errors.Unsupported):
                        raise
                    _log.debug("keepalive not supported by %s", s.uri)
            conn.registerCloseCallback(self._on_close, None)
            reg.callback_ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            )
            optional: list[tuple[int, Callable[..., None]]] = []
            if s.reboot_events:
                optional.append((libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot))
            if s.job_events:
                optional.append((libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job))
            for event_id, callback in optional:
                try:
                    reg.callback_ids.append(
                        conn.domainEventRegisterAny(None, event_id, callback, None)
                    )
                except libvirt.libvirtError as exc:
                    if not isinstance(errors.translate(exc), errors.Unsupported):
                        raise
        except BaseException:
            _dispose(reg)
            raise
        return reg

    def _connection_lost(self, conn: Any, reason: object) -> None:
        """Loop thread: forget ``conn`` (if still current) and start reconnecting."""
        if self._closing or self._loop is None:
            return
        if conn is not None and (self._reg is None or self._reg.conn is not conn):
            return  # a late callback for a connection already replaced
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return
        _log.warning("connection to %s lost (%s); reconnecting", self.settings.uri, reason)
        old, self._reg = self._reg, None
        self._connected.clear()
        self._reconnect_task = self._loop.create_task(self._reconnect_loop(old))

    async def _reconnect_loop(self, old: _Registration | None) -> None:
        if old is not None:
            await self._executors().run(_dispose, old)
        s = self.settings
        delays = backoff_delays(
            s.reconnect_backoff_initial, s.reconnect_backoff_max, s.reconnect_backoff_factor
        )
        while not self._closing:
            try:
                await self._connect_once()
                break
            except (errors.HypervisorError, OSError) as exc:
                delay = next(delays)
                _log.warning("reconnect to %s failed (%s); retry in %.1fs", s.uri, exc, delay)
                await asyncio.sleep(delay)
        else:
            return
        await self._run_hooks(reconnect=True)

    async def _run_hooks(self, *, reconnect: bool) -> None:
        for hook in list(self._hooks):
            try:
                await hook(reconnect)
            except Exception:
                _log.exception("reconnect hook %r failed", hook)

    # libvirt event thread -> asyncio loop --------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError as exc:  # loop closed between check and call
            _log.debug("event loop closed; dropped %s (%s)", getattr(fn, "__name__", fn), exc)

    def _on_close(self, conn: Any, reason: int, _opaque: Any) -> None:
        self._post(self._connection_lost, conn, _CLOSE_REASONS.get(reason, reason))

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self._post(
            self._fanout.dispatch, lifecycle_event(dom.UUIDString(), dom.name(), event, detail)
        )

    def _on_reboot(self, _conn: Any, dom: Any, _opaque: Any) -> None:
        self._post(
            self._fanout.dispatch, DomainEvent(dom.UUIDString(), dom.name(), EventKind.REBOOT)
        )

    def _on_job(self, _conn: Any, dom: Any, params: Any, _opaque: Any) -> None:
        job = parse_job_stats(params or {}, job_type=3)  # JobType.COMPLETED
        event = DomainEvent(dom.UUIDString(), dom.name(), EventKind.JOB_COMPLETED, job=job)
        self._post(self._fanout.dispatch, event)


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


def _define_validated_by_libvirt(conn: Any, xml: str) -> Any:
    """Worker thread: define with libvirt's validation; unvalidated if the driver lacks it."""
    try:
        return conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    except libvirt.libvirtError as exc:
        if not isinstance(errors.translate(exc), errors.Unsupported):
            raise
        _log.warning("driver cannot validate domain XML; defining unvalidated")
        return conn.defineXMLFlags(xml, 0)


def _dispose(reg: _Registration) -> None:
    """Worker thread: undo registrations and close; a dead connection errors, ignore."""
    for callback_id in reg.callback_ids:
        _undo(
            "deregister event callback",
            functools.partial(reg.conn.domainEventDeregisterAny, callback_id),
        )
    _undo("unregister close callback", lambda: reg.conn.unregisterCloseCallback())
    _undo("close", lambda: reg.conn.close())


def _undo(what: str, step: Callable[[], object]) -> None:
    """Worker thread: one step of disposing of a connection; a dead one errors, ignored."""
    try:
        step()
    except libvirt.libvirtError as exc:
        _log.debug("disposing of a connection: %s failed (%s); ignored", what, exc)
