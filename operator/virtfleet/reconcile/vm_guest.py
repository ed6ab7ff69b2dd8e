"""What a VM's status says from its guest agent: pure.

The agent's poller (``agent.guestagent``) asks qemu-guest-agent now and then and hands
the last answer to the VM's reconcile in :class:`~virtfleet.reconcile.vm_model.VmView`;
these functions put it into status: the guest's OS, hostname and filesystems
(``guestOSInfo``), each NIC's in-guest name and addresses (matched by MAC), and the
``AgentConnected`` condition while the domain runs (KubeVirt's, for a guest agent).
"""

from __future__ import annotations

from datetime import datetime

from virtfleet.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    remove_condition,
    rfc3339,
    set_condition,
)
from virtfleet.api.virtualmachine import GuestFilesystem, GuestOSInfo, InterfaceStatus
from virtfleet.domain.guestagent import GuestAgentReport

__all__ = ["agent_condition", "guest_os_info", "with_guest_addresses", "without_guest"]


def guest_os_info(
    report: GuestAgentReport | None, previous: GuestOSInfo | None = None
) -> GuestOSInfo | None:
    """From the agent's answer; no answer yet: ``previous`` stays (no flap)."""
    if report is None:
        return previous
    if not report.connected:
        return None
    return GuestOSInfo(
        id=report.os_id,
        name=report.os_name,
        pretty_name=report.os_pretty_name,
        version=report.os_version,
        kernel_release=report.kernel_release,
        hostname=report.hostname,
        filesystems=[
            GuestFilesystem(mount_point=fs.mount_point, type=fs.type) for fs in report.filesystems
        ],
    )


def with_guest_addresses(
    nic: InterfaceStatus, report: GuestAgentReport | None, previous: InterfaceStatus | None
) -> InterfaceStatus:
    """``nic`` with what the agent reports for the guest interface of the same MAC (the
    guest's word, kept apart from ``ip``, the VMNetwork's record). No report yet (an
    agent restart, a migration's target): what ``previous`` said stays."""
    if report is None:
        if previous is None:
            return nic
        return nic.model_copy(
            update={
                "interface_name": previous.interface_name,
                "ip_addresses": previous.ip_addresses,
            }
        )
    if not report.connected:
        return nic
    seen = next((i for i in report.interfaces if i.mac == nic.mac.lower()), None)
    if seen is None:
        return nic
    return nic.model_copy(
        update={"interface_name": seen.name, "ip_addresses": list(seen.addresses)}
    )


def without_guest(nic: InterfaceStatus) -> InterfaceStatus:
    """A NIC of a guest that does not run: nothing the agent said about it stays."""
    return nic.model_copy(update={"interface_name": None, "ip_addresses": []})


def agent_condition(
    conditions: list[Condition],
    *,
    running: bool,
    report: GuestAgentReport | None,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """``AgentConnected`` while the domain runs and the agent was asked; gone otherwise."""
    if not running:
        return remove_condition(conditions, ConditionType.AGENT_CONNECTED)
    if report is None:
        return conditions  # not asked yet since it started: no news
    if report.connected:
        status, reason, message = ConditionStatus.TRUE, "Connected", "qemu-guest-agent answers"
    else:
        status, reason = ConditionStatus.FALSE, "NotConnected"
        message = (
            f"qemu-guest-agent did not answer: {report.error}"
            if report.error
            else "no qemu-guest-agent is connected (not installed in the guest, or not started yet)"
        )
    return set_condition(
        conditions,
        type=ConditionType.AGENT_CONNECTED,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
        now=rfc3339(now),
    )
