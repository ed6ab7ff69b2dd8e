"""What a VM's status says from its guest agent (reconcile.vm_guest)."""

from __future__ import annotations

from datetime import UTC, datetime

from virtfleet.api.conditions import Condition, ConditionStatus, ConditionType
from virtfleet.api.virtualmachine import InterfaceStatus
from virtfleet.domain.guestagent import AgentFilesystem, AgentInterface, GuestAgentReport
from virtfleet.reconcile.vm_guest import (
    agent_condition,
    guest_os_info,
    with_guest_addresses,
    without_guest,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REPORT = GuestAgentReport(
    connected=True,
    os_id="debian",
    os_pretty_name="Debian GNU/Linux 12 (bookworm)",
    hostname="web",
    interfaces=(AgentInterface("eth0", "0e:00:00:00:00:01", ("10.0.0.5", "fd00::5")),),
    filesystems=(AgentFilesystem("/", "ext4"),),
)


def test_the_guest_os_is_reported_only_from_a_connected_agent() -> None:
    info = guest_os_info(REPORT)
    assert info is not None
    assert info.to_wire()["prettyName"] == "Debian GNU/Linux 12 (bookworm)"
    assert info.to_wire()["filesystems"] == [{"mountPoint": "/", "type": "ext4"}]
    assert guest_os_info(GuestAgentReport(connected=False)) is None
    assert guest_os_info(None) is None


def test_addresses_join_the_nic_of_the_same_mac_apart_from_the_vmnetwork_record() -> None:
    recorded = InterfaceStatus(name="lan", mac="0E:00:00:00:00:01", ip="10.9.9.9")
    seen = with_guest_addresses(recorded, REPORT, None)
    assert (seen.interface_name, seen.ip, seen.ip_addresses) == (
        "eth0",
        "10.9.9.9",  # virtfleet's record, never the guest's word
        ["10.0.0.5", "fd00::5"],
    )
    other = InterfaceStatus(name="x", mac="0e:00:00:00:00:02")
    assert with_guest_addresses(other, REPORT, None) == other
    # No answer yet (an agent restart, a migration's target): what was said stays...
    assert with_guest_addresses(recorded, None, seen) == seen
    # ...and a guest that stopped keeps nothing of it.
    assert without_guest(seen) == recorded
    assert guest_os_info(None, guest_os_info(REPORT)) == guest_os_info(REPORT)


def test_agent_connected_follows_the_answers_while_running_and_goes_when_stopped() -> None:
    def ask(
        running: bool, report: GuestAgentReport | None, conditions: list[Condition] | None = None
    ) -> list[Condition]:
        return agent_condition(
            conditions or [], running=running, report=report, generation=1, now=NOW
        )

    (up,) = ask(True, REPORT)
    assert (up.type, up.status, up.reason) == (
        ConditionType.AGENT_CONNECTED,
        ConditionStatus.TRUE,
        "Connected",
    )
    (down,) = ask(True, GuestAgentReport(connected=False))
    assert (down.status, down.reason) == (ConditionStatus.FALSE, "NotConnected")
    assert "not installed" in down.message
    assert ask(True, None, [up]) == [up]  # not asked since it started: no news
    assert ask(False, REPORT, [up]) == []
