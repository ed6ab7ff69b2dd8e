"""One libvirt domain, as an async object with plain-value results.

A :class:`Guest` wraps a ``virDomain`` handle bound to the connection it came from. After
a reconnect the handle is stale (it keeps the old connection referenced; when that one
died, its calls raise :class:`~virtfleet.hypervisor.errors.ConnectionLost`): treat
guests as short-lived and look them up again per reconcile. ``uuid`` and ``name`` are
cached at construction (libvirt keeps them client-side, so reading them is free and
works even when the handle is stale).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from virtfleet.domain.guestagent import channel_connected
from virtfleet.domain.jobs import JobProgress, parse_job_info, parse_job_stats
from virtfleet.hypervisor import errors
from virtfleet.hypervisor.executor import Executors

__all__ = [
    "Guest",
    "GuestState",
    "GuestStatus",
    "OwnedGuest",
    "StopOutcome",
    "StopPath",
    "graceful_stop",
    "guest_status",
]

_log = logging.getLogger(__name__)


class GuestState(enum.StrEnum):
    """``virDomainState``, in libvirt's order."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    #: Shutting down (in progress), not yet off.
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @property
    def active(self) -> bool:
        """A QEMU process exists (everything but shut off and crashed-and-gone)."""
        return self not in (GuestState.SHUTOFF, GuestState.CRASHED, GuestState.NOSTATE)


_STATES = tuple(GuestState)

# virDomain<State>Reason enums, in order (libvirt ABI; checked against the binding in tests).
_REASONS: dict[GuestState, tuple[str, ...]] = {
    GuestState.NOSTATE: ("unknown",),
    GuestState.RUNNING: (
        "unknown",
        "booted",
        "migrated",
        "restored",
        "from-snapshot",
        "unpaused",
        "migration-canceled",
        "save-canceled",
        "wakeup",
        "crashed",
        "postcopy",
        "postcopy-failed",
    ),
    GuestState.BLOCKED: ("unknown",),
    GuestState.PAUSED: (
        "unknown",
        "user",
        "migration",
        "save",
        "dump",
        "ioerror",
        "watchdog",
        "from-snapshot",
        "shutting-down",
        "snapshot",
        "crashed",
        "starting-up",
        "postcopy",
        "postcopy-failed",
        "api-error",
    ),
    GuestState.SHUTDOWN: ("unknown", "user"),
    GuestState.SHUTOFF: (
        "unknown",
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from-snapshot",
        "daemon",
    ),
    GuestState.CRASHED: ("unknown", "panicked"),
    GuestState.PMSUSPENDED: ("unknown",),
}


#: ``virDomainSetBlockIoTune`` parameter names virtfleet manages.
IOTUNE_PARAMETERS = (
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
)
#: ``virDomainSetInterfaceParameters`` names (KiB/s and KiB, as in ``<bandwidth>``).
BANDWIDTH_PARAMETERS = tuple(
    f"{direction}.{field}"
    for direction in ("inbound", "outbound")
    for field in ("average", "peak", "burst")
)


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """A domain's state and why it is in it (``reason`` readable, ``reason_code`` raw)."""

    state: GuestState
    reason: str
    reason_code: int


def guest_status(state: int, reason: int) -> GuestStatus:
    """Decode ``virDomain.state()``; numbers from a newer libvirt stay visible, not fatal."""
    kind = _STATES[state] if 0 <= state < len(_STATES) else GuestState.NOSTATE
    names = _REASONS[kind]
    name = names[reason] if 0 <= reason < len(names) else f"unknown-{reason}"
    return GuestStatus(state=kind, reason=name, reason_code=reason)


class Guest:
    """Async operations on one domain; blocking calls run in the hypervisor's executors."""

    def __init__(self, dom: Any, executors: Executors) -> None:
        self._dom = dom
        self._ex = executors
        self.uuid: str = str(dom.UUIDString())
        self.name: str = str(dom.name())

    def __repr__(self) -> str:
        return f"Guest(name={self.name!r}, uuid={self.uuid!r})"

    @property
    def handle(self) -> Any:
        """The raw ``virDomain``, for sibling modules of this package only."""
        return self._dom

    @property
    def executors(self) -> Executors:
        """The executors this guest's calls run in (for sibling modules)."""
        return self._ex

    async def status(self) -> GuestStatus:
        """Current state and reason."""
        state, reason = await self._ex.run(self._dom.state, 0)
        return guest_status(int(state), int(reason))

    async def xml(self, *, inactive: bool = False) -> str:
        """Live XML, or with ``inactive`` the persistent config (what the next boot uses).

        Never with ``VIR_DOMAIN_XML_SECURE``: secrets must not travel into status or logs.
        """
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(await self._ex.run(self._dom.XMLDesc, flags))

    async def is_persistent(self) -> bool:
        """Has a persistent config (survives shutdown), as opposed to a transient domain."""
        return bool(await self._ex.run(self._dom.isPersistent))

    async def is_active(self) -> bool:
        """A QEMU process exists."""
        return bool(await self._ex.run(self._dom.isActive))

    async def start(self, *, paused: bool = False) -> None:
        """Boot the domain (``paused`` boots with CPUs stopped). Long pool: QEMU starts slowly."""
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        await self._ex.run_long(self._dom.createWithFlags, flags)

    async def shutdown(self) -> None:
        """Ask the guest OS to power off via ACPI; returns at once, the guest decides when.

        ACPI explicitly, not the guest agent: libvirt's agent shutdown waits (up to 60 s)
        for the guest to go down, which would hold an executor thread past a short grace
        period. Drivers without shutdown modes get the default.
        """

        def call() -> None:
            try:
                self._dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as exc:
                if not isinstance(errors.translate(exc), errors.Unsupported):
                    raise
                self._dom.shutdown()

        await self._ex.run(call)

    async def shutdown_via_agent(self) -> None:
        """Ask the guest OS to power off through qemu-guest-agent (``guest-shutdown``).

        libvirt returns only when the guest is down (or after its 60 s agent wait): run in
        the long pool, and not awaited by :func:`graceful_stop` beyond a first answer.
        """
        await self._ex.run_long(self._dom.shutdownFlags, libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)

    async def destroy(self) -> None:
        """Power off at once (like pulling the plug). The definition stays."""
        await self._ex.run_long(self._dom.destroy)

    async def suspend(self) -> None:
        """Pause the vCPUs; memory stays allocated."""
        await self._ex.run(self._dom.suspend)

    async def resume(self) -> None:
        """Continue paused vCPUs."""
        await self._ex.run(self._dom.resume)

    async def undefine(self, *, keep_nvram: bool = False) -> None:
        """Remove the definition, with its managed-save image, snapshot/checkpoint metadata
        and (unless ``keep_nvram``) its UEFI variable store. Storage volumes are never
        removed here: disks belong to the storage layer.

        Drivers reject flags they do not know, so fewer flags are retried. Dropping a flag
        is safe: libvirt then *refuses* to undefine a domain with that kind of state
        rather than leaving it behind, and the error reaches the caller.
        """
        nvram = (
            libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
            if keep_nvram
            else (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        )
        base = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        attempts = (
            base | nvram | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
            base | nvram,
            base,
        )

        def call() -> None:
            for flags in attempts[:-1]:
                try:
                    self._dom.undefineFlags(flags)
                    return
                except libvirt.libvirtError as exc:
                    if not isinstance(errors.translate(exc), errors.Unsupported):
                        raise
            self._dom.undefineFlags(attempts[-1])

        await self._ex.run(call)

    async def set_block_iotune(self, target: str, limits: Mapping[str, int]) -> None:
        """Apply disk I/O limits to the running domain (``target`` like ``vda``).

        Every known limit is sent, unset ones as 0 ("no limit"), so a removed limit is
        removed live too. Live only: the agent has already redefined the persistent config.
        """
        params = {name: int(limits.get(name, 0)) for name in IOTUNE_PARAMETERS}
        await self._ex.run(self._dom.setBlockIoTune, target, params, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    async def set_interface_bandwidth(self, device: str, params: Mapping[str, int]) -> None:
        """Apply ``inbound.average``-style bandwidth parameters live to NIC ``device`` (MAC)."""
        values = {name: int(params.get(name, 0)) for name in BANDWIDTH_PARAMETERS}
        await self._ex.run(
            self._dom.setInterfaceParameters, device, values, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )

    async def set_memory(self, kib: int) -> bool:
        """Set the current memory (balloon) in KiB, in the config and live when running.

        Returns whether the running guest took it; ``False`` means the config changed but
        the guest needs a restart (no balloon, above the maximum, ...).
        """
        return await self._ex.run(self._apply_live_and_config, self._dom.setMemoryFlags, kib)

    async def set_vcpus(self, count: int) -> bool:
        """Set the active vCPU count, in the config and live when running (see set_memory)."""
        return await self._ex.run(self._apply_live_and_config, self._dom.setVcpusFlags, count)

    def _apply_live_and_config(self, setter: Any, value: int) -> bool:
        persistent = bool(self._dom.isPersistent())
        if persistent:
            setter(value, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if not self._dom.isActive():
            return False
        try:
            setter(value, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            translated = errors.translate(exc)
            if not persistent or isinstance(translated, errors.ConnectionLost):
                raise
            _log.info("live change of %s refused, config only: %s", self.name, translated)
            return False
        return True

    async def metadata(self, ns_uri: str) -> str | None:
        """The custom ``<metadata>`` element of namespace ``ns_uri``, or ``None``.

        libvirt returns the element without its namespace prefix (``<owner .../>``).
        """
        try:
            return str(
                await self._ex.run(
                    self._dom.metadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns_uri, 0
                )
            )
        except errors.NotFound:
            return None

    async def job_progress(self) -> JobProgress:
        """The running job's counters (``jobStats``, or legacy ``jobInfo`` on old drivers)."""

        def call() -> JobProgress:
            try:
                return parse_job_stats(self._dom.jobStats(0))
            except libvirt.libvirtError as exc:
                if not isinstance(errors.translate(exc), errors.Unsupported):
                    raise
            return parse_job_info(self._dom.jobInfo())

        return await self._ex.run(call)


@dataclass(frozen=True, slots=True)
class OwnedGuest:
    """A domain carrying our ownership element, with that element as libvirt returned it."""

    guest: Guest
    metadata_xml: str

    @property
    def attributes(self) -> dict[str, str]:
        """The ownership element's attributes (``namespace``, ``name``, ``uid``, ...)."""
        element = etree.fromstring(self.metadata_xml.encode())
        return {str(k): str(v) for k, v in element.attrib.items()}


class StopPath(enum.StrEnum):
    """How :func:`graceful_stop` ended."""

    #: Nothing to do: the domain was not running.
    ALREADY_STOPPED = "already-stopped"
    #: The guest OS powered off after the ACPI request, within the grace period.
    SHUTDOWN = "shutdown"
    #: The grace period ran out; the domain was destroyed.
    DESTROYED_AFTER_GRACE = "destroyed-after-grace"
    #: Destroyed without asking: grace 0, or a paused/crashed guest that cannot react.
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class StopOutcome:
    """Which path :func:`graceful_stop` took and how long it waited."""

    path: StopPath
    waited_seconds: float
    #: How the guest was asked: ``agent`` (qemu-guest-agent), ``acpi`` or ``none``.
    asked: str = "none"


_CANNOT_REACT = {GuestState.PAUSED, GuestState.CRASHED, GuestState.PMSUSPENDED}


async def graceful_stop(
    guest: Guest, grace_seconds: float, *, poll_interval: float = 0.5
) -> StopOutcome:
    """Ask the guest to power off, poll until shut off, destroy when ``grace_seconds`` run out.

    Asked through qemu-guest-agent when its channel is connected (and it does not refuse
    within :data:`AGENT_ANSWER_SECONDS`), through the ACPI power button otherwise.

    A paused, crashed or PM-suspended guest cannot react to ACPI, so waiting would only
    delay the inevitable: it is destroyed at once. Races with the domain stopping by
    itself ("domain is not running" from shutdown/destroy) count as success.
    """
    started = time.monotonic()

    def waited() -> float:
        return round(time.monotonic() - started, 3)

    status = await guest.status()
    if not status.state.active:
        return StopOutcome(StopPath.ALREADY_STOPPED, 0.0)
    if grace_seconds <= 0 or status.state in _CANNOT_REACT:
        await _destroy_if_running(guest)
        return StopOutcome(StopPath.DESTROYED, waited())
    asked = "agent" if await _asked_agent(guest) else "acpi"
    try:
        if asked == "acpi":
            await guest.shutdown()
    except errors.ConnectionLost:
        raise
    except errors.JobStuck:
        # No ACPI request gets through a stuck job; destroy kills QEMU before it waits.
        await _destroy_if_running(guest)
        return StopOutcome(StopPath.DESTROYED, waited(), asked)
    except errors.HypervisorError:
        # Drivers differ in how they say "not running" (OPERATION_INVALID on QEMU, an
        # internal error on the test driver): decide by the state, not by the code.
        if not (await guest.status()).state.active:
            return StopOutcome(StopPath.SHUTDOWN, waited(), asked)
        raise
    deadline = started + grace_seconds
    while True:
        if not (await guest.status()).state.active:
            return StopOutcome(StopPath.SHUTDOWN, waited(), asked)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(poll_interval, remaining))
    if await _destroy_if_running(guest):
        return StopOutcome(StopPath.DESTROYED_AFTER_GRACE, waited(), asked)
    return StopOutcome(StopPath.SHUTDOWN, waited(), asked)


#: Seconds the guest agent has to refuse a shutdown before ACPI is used instead.
AGENT_ANSWER_SECONDS = 3.0
#: Agent shutdowns still waiting in libvirt (asyncio keeps tasks only weakly).
_agent_shutdowns: set[asyncio.Task[None]] = set()


async def _asked_agent(guest: Guest) -> bool:
    """Ask through the guest agent when its channel is connected (a clean shutdown even
    of a guest that ignores the power button); False: not asked, or it refused at once."""
    try:
        if not channel_connected(await guest.xml()):
            return False
    except errors.HypervisorError as exc:
        _log.info("guest agent channel not read: %s", exc)
        return False
    task = asyncio.create_task(guest.shutdown_via_agent())
    done, _ = await asyncio.wait({task}, timeout=AGENT_ANSWER_SECONDS)
    if task in done:
        failure = task.exception()
        if failure is not None:
            _log.info("guest agent shutdown refused (%s): the power button instead", failure)
            return False
        return True
    # libvirt waits for the guest to go down; the stop loop polls meanwhile.
    _agent_shutdowns.add(task)
    task.add_done_callback(_agent_shutdown_done)
    return True


def _agent_shutdown_done(task: asyncio.Task[None]) -> None:
    _agent_shutdowns.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # Usual when the guest went down (or was destroyed) before libvirt heard back.
        _log.debug("guest agent shutdown ended: %s", task.exception())


async def _destroy_if_running(guest: Guest) -> bool:
    """Destroy; ``False`` if it had stopped meanwhile (not an error)."""
    try:
        await guest.destroy()
    except errors.ConnectionLost:
        raise
    except errors.HypervisorError:
        if (await guest.status()).state.active:
            raise
        return False
    return True
