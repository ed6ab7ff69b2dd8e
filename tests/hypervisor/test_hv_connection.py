"""The long-lived connection: open/close, events into asyncio, reconnect with backoff."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from typing import Any

import libvirt
import pytest

from virtfleet.hypervisor import (
    ConnectionLost,
    DomainEvent,
    EventKind,
    Hypervisor,
    HypervisorSettings,
    eventloop,
)
from virtfleet.hypervisor.settings import backoff_delays


async def _next_event(queue: asyncio.Queue[DomainEvent], kind: EventKind) -> DomainEvent:
    """The next event of ``kind`` (others, e.g. ``defined``, are skipped)."""
    while True:
        event = await asyncio.wait_for(queue.get(), timeout=5)
        if event.event is kind:
            return event


async def test_open_and_close(settings: HypervisorSettings) -> None:
    hv = Hypervisor(settings)
    assert not hv.connected
    await hv.open()
    assert hv.connected
    assert hv.connection_generation == 1
    assert eventloop.is_running()
    await hv.open()  # idempotent
    assert hv.connection_generation == 1
    await hv.close()
    assert not hv.connected
    await hv.close()  # idempotent
    with pytest.raises(ConnectionLost):
        await hv.lookup("6695eb01-f6a4-8304-79aa-97f2502e193f")


async def test_guest_outliving_its_hypervisor(settings: HypervisorSettings) -> None:
    hv = Hypervisor(settings)
    await hv.open()
    guest = await hv.lookup_by_name("foreign-plain")
    await hv.close()
    assert guest is not None
    with pytest.raises(ConnectionLost):
        await guest.status()


async def test_reopen_after_close(settings: HypervisorSettings) -> None:
    hv = Hypervisor(settings)
    await hv.open()
    await hv.close()
    await hv.open()
    try:
        assert hv.connected
        assert await hv.lookup_by_name("foreign-plain") is not None
    finally:
        await hv.close()


async def test_keepalive_unsupported_by_test_driver_is_tolerated(
    settings: HypervisorSettings,
) -> None:
    # setKeepAlive raises VIR_ERR_NO_SUPPORT on test:///; open must still succeed.
    hv = Hypervisor(replace(settings, keepalive_interval=5, keepalive_count=3))
    await hv.open()
    await hv.close()


async def test_open_failure_raises_and_leaves_closed(settings: HypervisorSettings) -> None:
    hv = Hypervisor(replace(settings, uri="test:///nonexistent/dir/node.xml"))
    with pytest.raises(Exception, match=r"(?i)no such file|failed|open"):
        await hv.open()
    assert not hv.connected


async def test_first_open_runs_hooks_with_reconnect_false(settings: HypervisorSettings) -> None:
    calls: list[bool] = []

    async def hook(reconnect: bool) -> None:
        calls.append(reconnect)

    hv = Hypervisor(settings)
    hv.on_reconnect(hook)
    await hv.open()
    await hv.close()
    assert calls == [False]


async def test_lifecycle_events_arrive_in_asyncio(hv: Hypervisor, domain_xml: Any) -> None:
    queue = hv.subscribe()
    seen: list[DomainEvent] = []

    async def callback(event: DomainEvent) -> None:
        seen.append(event)

    hv.on_event(callback)
    guest = await hv.define(domain_xml("ev1"))
    defined = await _next_event(queue, EventKind.DEFINED)
    assert (defined.uuid, defined.name, defined.detail) == (guest.uuid, "ev1", "added")

    await guest.start()
    started = await _next_event(queue, EventKind.STARTED)
    assert (started.uuid, started.detail) == (guest.uuid, "booted")

    await guest.destroy()
    stopped = await _next_event(queue, EventKind.STOPPED)
    assert stopped.detail == "destroyed"

    await asyncio.sleep(0.05)
    assert [e.event for e in seen] == [EventKind.DEFINED, EventKind.STARTED, EventKind.STOPPED]

    hv.unsubscribe(queue)
    await guest.start()
    await asyncio.sleep(0.1)
    assert queue.empty()


async def test_full_bounded_queue_drops_and_counts(hv: Hypervisor, domain_xml: Any) -> None:
    queue = hv.subscribe(maxsize=1)
    guest = await hv.define(domain_xml("ev2"))
    await guest.start()
    await guest.destroy()
    for _ in range(50):
        if hv.events_dropped >= 2:
            break
        await asyncio.sleep(0.02)
    assert queue.qsize() == 1
    assert hv.events_dropped == 2


async def test_failing_event_callback_does_not_stop_others(hv: Hypervisor, domain_xml: Any) -> None:
    seen: list[str] = []

    async def broken(event: DomainEvent) -> None:
        raise RuntimeError("bug in a consumer")

    async def fine(event: DomainEvent) -> None:
        seen.append(event.name)

    hv.on_event(broken)
    hv.on_event(fine)
    await hv.define(domain_xml("ev3"))
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen == ["ev3"]


async def test_close_callback_triggers_reconnect_and_hooks(hv: Hypervisor, domain_xml: Any) -> None:
    reconnected = asyncio.Event()
    calls: list[bool] = []

    async def hook(reconnect: bool) -> None:
        calls.append(reconnect)
        reconnected.set()

    hv.on_reconnect(hook)
    old_conn = hv._reg.conn if hv._reg else None
    stale = await hv.define(domain_xml("before-loss"))

    # libvirt calls the close callback on its event thread; do the same.
    thread = threading.Thread(
        target=hv._on_close, args=(old_conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    )
    thread.start()
    thread.join()
    await asyncio.wait_for(reconnected.wait(), timeout=5)

    assert calls == [True]
    assert hv.connected
    assert hv.connection_generation == 2
    assert hv._reg is not None
    assert hv._reg.conn is not old_conn
    # The fresh test-driver instance lost the domain, like a real libvirtd would lose
    # transient state: the hook's resync is what repairs that.
    assert await hv.lookup(stale.uuid) is None

    # Events flow on the new connection.
    queue = hv.subscribe()
    await hv.define(domain_xml("after-loss"))
    assert (await _next_event(queue, EventKind.DEFINED)).name == "after-loss"


async def test_late_close_callback_of_replaced_connection_is_ignored(hv: Hypervisor) -> None:
    generation = hv.connection_generation
    hv._connection_lost(object(), "eof")  # not the current connection
    await asyncio.sleep(0.05)
    assert hv.connection_generation == generation
    assert hv.connected


async def test_reconnect_retries_with_backoff(settings: HypervisorSettings) -> None:
    attempts: list[str] = []
    fail_next = 0

    def connect(uri: str, readonly: bool) -> Any:
        nonlocal fail_next
        attempts.append(uri)
        if fail_next > 0:
            fail_next -= 1
            raise ConnectionLost("libvirtd is down")
        return libvirt.open(uri)

    hv = Hypervisor(settings, connect=connect)
    done = asyncio.Event()

    async def hook(reconnect: bool) -> None:
        if reconnect:
            done.set()

    hv.on_reconnect(hook)
    await hv.open()
    try:
        fail_next = 3
        await hv.reconnect()
        assert not hv.connected
        await asyncio.wait_for(done.wait(), timeout=5)
        assert hv.connected
        assert len(attempts) == 1 + 3 + 1
        assert hv.connection_generation == 2
    finally:
        await hv.close()


async def test_close_stops_a_reconnect_in_progress(settings: HypervisorSettings) -> None:
    def connect(uri: str, readonly: bool) -> Any:
        if hv.connection_generation >= 1:
            raise ConnectionLost("libvirtd is down")
        return libvirt.open(uri)

    hv = Hypervisor(settings, connect=connect)
    await hv.open()
    await hv.reconnect()
    await asyncio.sleep(0.1)  # a few failed attempts
    await asyncio.wait_for(hv.close(), timeout=5)
    assert not hv.connected
    assert hv._reconnect_task is None


async def test_wait_connected(hv: Hypervisor) -> None:
    await hv.wait_connected(timeout=1)


def test_backoff_grows_and_is_capped() -> None:
    delays = backoff_delays(0.5, 4.0)
    assert [next(delays) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    flat = backoff_delays(1.0, 1.0, factor=3)
    assert [next(flat) for _ in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "bad",
    [
        {"keepalive_interval": 0},
        {"keepalive_count": -1},
        {"reconnect_backoff_initial": 0},
        {"reconnect_backoff_initial": 10, "reconnect_backoff_max": 1},
        {"reconnect_backoff_factor": 0.5},
        {"executor_workers": 0},
        {"long_executor_workers": 0},
    ],
)
def test_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any message
        HypervisorSettings(**bad)


async def test_blocking_calls_run_in_named_threads(hv: Hypervisor) -> None:
    names = await hv.call(lambda conn: threading.current_thread().name)
    long_names = await hv.call_long(lambda conn: threading.current_thread().name)
    assert names.startswith("test-libvirt_")
    assert long_names.startswith("test-libvirt-long_")
    assert threading.current_thread() is threading.main_thread()


async def test_host_facts(hv: Hypervisor) -> None:
    facts = await hv.host_facts()
    assert facts.hypervisor_type == "TEST"
    assert facts.cpus == 16
    assert facts.memory_bytes == 3072 * 1024 * 1024
    assert facts.libvirt_version.count(".") == 2
