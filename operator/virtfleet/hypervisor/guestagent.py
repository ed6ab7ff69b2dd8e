"""Asking a domain's qemu-guest-agent what it knows (OS, hostname, addresses, filesystems).

Only when its channel is connected (read from the live XML, no agent involved), and with
libvirt's agent timeout set short: a hung agent costs seconds in the executor, never the
reconcile loop (the agent's poller calls this, not the VM's reconcile).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

import libvirt

from virtfleet.domain.guestagent import GuestAgentReport, channel_connected, report_from
from virtfleet.hypervisor.errors import HypervisorError
from virtfleet.hypervisor.guest import Guest

__all__ = [
    "FreezeResult",
    "GuestAgentBusyError",
    "agent_report",
    "freeze_filesystems",
    "is_frozen_error",
    "thaw_filesystems",
]

#: Seconds libvirt waits for the agent's answer to each command.
AGENT_TIMEOUT_S: Final = 5
#: A freeze syncs every filesystem first: it may take longer than a question.
FREEZE_TIMEOUT_S: Final = 60
_INFO_TYPES: Final = (
    libvirt.VIR_DOMAIN_GUEST_INFO_OS
    | libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME
    | libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM
)


class GuestAgentBusyError(HypervisorError):
    """Another call (a freeze for a snapshot) is talking to this guest's agent: ask later."""


#: One conversation with a guest's agent at a time: libvirt's agent timeout is set per
#: domain, so a poll (5 s) must not shorten a freeze's (60 s) half-way.
_talking: dict[str, threading.Lock] = {}
_talking_guard = threading.Lock()


#: Locks kept at most (those of gone domains are dropped when idle).
_MAX_LOCKS: Final = 4096


def _lock_of(guest: Guest) -> threading.Lock:
    with _talking_guard:
        if guest.uuid not in _talking and len(_talking) >= _MAX_LOCKS:
            for uuid in [u for u, lock in _talking.items() if not lock.locked()]:
                del _talking[uuid]
        return _talking.setdefault(guest.uuid, threading.Lock())


def is_frozen_error(message: str) -> bool:
    """qemu-guest-agent refuses everything but thaw and status while frozen, saying so."""
    return "frozen state" in message


async def agent_report(guest: Guest) -> GuestAgentReport:
    """What the guest's agent says; ``connected=False`` (with why) when it cannot say.

    Raises :class:`GuestAgentBusyError` while a freeze or thaw is talking to it.
    """
    if not channel_connected(await guest.xml()):
        return GuestAgentReport(connected=False)
    dom = guest.handle
    lock = _lock_of(guest)

    def ask() -> GuestAgentReport:
        if not lock.acquire(blocking=False):
            raise GuestAgentBusyError(f"{guest.name}: its guest agent is busy (a freeze?)")
        try:
            dom.agentSetResponseTimeout(AGENT_TIMEOUT_S, 0)
            info = dom.guestInfo(_INFO_TYPES, 0)
            addresses = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
        except libvirt.libvirtError as exc:
            message = str(exc.get_error_message())
            return GuestAgentReport(connected=False, error=message, frozen=is_frozen_error(message))
        finally:
            lock.release()
        return report_from(info or {}, addresses or {})

    return await guest.executors.run(ask)


@dataclass(frozen=True)
class FreezeResult:
    """``attempted`` False: no agent is connected (nothing was frozen). Otherwise
    ``error`` is None when every filesystem froze; a failed freeze may have frozen some,
    so the caller thaws whenever one was attempted."""

    attempted: bool
    frozen: int = 0
    error: str | None = None


async def freeze_filesystems(guest: Guest) -> FreezeResult:
    """Freeze the guest's filesystems through its agent (``guest-fsfreeze-freeze``)."""
    if not channel_connected(await guest.xml()):
        return FreezeResult(attempted=False)
    dom = guest.handle

    def freeze() -> FreezeResult:
        with _lock_of(guest):
            try:
                dom.agentSetResponseTimeout(FREEZE_TIMEOUT_S, 0)
                return FreezeResult(attempted=True, frozen=int(dom.fsFreeze(None, 0)))
            except libvirt.libvirtError as exc:
                return FreezeResult(attempted=True, error=str(exc.get_error_message()))

    return await guest.executors.run_long(freeze)


async def thaw_filesystems(guest: Guest) -> int:
    """Thaw them (``guest-fsfreeze-thaw``): how many were thawed; 0 when none was frozen.

    Raises :class:`~virtfleet.hypervisor.errors.HypervisorError` when the agent cannot be
    asked (the caller logs it: a thaw is retried by the next decision, not by this call).
    """
    dom = guest.handle

    def thaw() -> int:
        with _lock_of(guest):
            dom.agentSetResponseTimeout(FREEZE_TIMEOUT_S, 0)
            return int(dom.fsThaw(None, 0))

    return await guest.executors.run_long(thaw)
