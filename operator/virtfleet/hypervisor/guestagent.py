"""Asking a domain's qemu-guest-agent what it knows (OS, hostname, addresses, filesystems).

Only when its channel is connected (read from the live XML, no agent involved), and with
libvirt's agent timeout set short: a hung agent costs seconds in the executor, never the
reconcile loop (the agent's poller calls this, not the VM's reconcile).
"""

from __future__ import annotations

from typing import Final

import libvirt

from virtfleet.domain.guestagent import GuestAgentReport, channel_connected, report_from
from virtfleet.hypervisor.guest import Guest

__all__ = ["agent_report"]

#: Seconds libvirt waits for the agent's answer to each command.
AGENT_TIMEOUT_S: Final = 5
_INFO_TYPES: Final = (
    libvirt.VIR_DOMAIN_GUEST_INFO_OS
    | libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME
    | libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM
)


async def agent_report(guest: Guest) -> GuestAgentReport:
    """What the guest's agent says; ``connected=False`` (with why) when it cannot say."""
    if not channel_connected(await guest.xml()):
        return GuestAgentReport(connected=False)
    dom = guest.handle

    def ask() -> GuestAgentReport:
        try:
            dom.agentSetResponseTimeout(AGENT_TIMEOUT_S, 0)
            info = dom.guestInfo(_INFO_TYPES, 0)
            addresses = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
        except libvirt.libvirtError as exc:
            return GuestAgentReport(connected=False, error=str(exc.get_error_message()))
        return report_from(info or {}, addresses or {})

    return await guest.executors.run(ask)
