"""Event and state tables against the libvirt binding (they are libvirt's ABI)."""

from __future__ import annotations

import libvirt
import pytest

from virtfleet.hypervisor.events import EventKind, lifecycle_event
from virtfleet.hypervisor.guest import GuestState, guest_status

EVENT_PREFIXES = {
    EventKind.DEFINED: "DEFINED",
    EventKind.UNDEFINED: "UNDEFINED",
    EventKind.STARTED: "STARTED",
    EventKind.SUSPENDED: "SUSPENDED",
    EventKind.RESUMED: "RESUMED",
    EventKind.STOPPED: "STOPPED",
    EventKind.SHUTDOWN: "SHUTDOWN",
    EventKind.PMSUSPENDED: "PMSUSPENDED",
    EventKind.CRASHED: "CRASHED",
}


def _libvirt_names(prefix: str) -> dict[int, str]:
    """``{value: readable}`` for libvirt constants ``<prefix>X`` (without ``_LAST``)."""
    return {
        getattr(libvirt, attr): attr[len(prefix) :].lower().replace("_", "-")
        for attr in dir(libvirt)
        if attr.startswith(prefix) and not attr.endswith("_LAST")
    }


@pytest.mark.parametrize(("kind", "prefix"), EVENT_PREFIXES.items())
def test_lifecycle_tables_match_binding(kind: EventKind, prefix: str) -> None:
    code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{prefix}")
    for detail, name in _libvirt_names(f"VIR_DOMAIN_EVENT_{prefix}_").items():
        event = lifecycle_event("u", "n", code, detail)
        assert event.event is kind
        assert event.detail == name
        assert event.detail_code == detail


def test_unknown_numbers_stay_visible() -> None:
    event = lifecycle_event("u", "n", 42, 7)
    assert event.event is EventKind.UNKNOWN
    assert event.detail == "unknown-7"
    assert lifecycle_event("u", "n", libvirt.VIR_DOMAIN_EVENT_STOPPED, 99).detail == "unknown-99"


STATE_PREFIXES = {
    GuestState.NOSTATE: ("VIR_DOMAIN_NOSTATE", "VIR_DOMAIN_NOSTATE_"),
    GuestState.RUNNING: ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_"),
    GuestState.BLOCKED: ("VIR_DOMAIN_BLOCKED", "VIR_DOMAIN_BLOCKED_"),
    GuestState.PAUSED: ("VIR_DOMAIN_PAUSED", "VIR_DOMAIN_PAUSED_"),
    GuestState.SHUTOFF: ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_"),
    GuestState.CRASHED: ("VIR_DOMAIN_CRASHED", "VIR_DOMAIN_CRASHED_"),
}


@pytest.mark.parametrize(("state", "names"), STATE_PREFIXES.items())
def test_state_reason_tables_match_binding(state: GuestState, names: tuple[str, str]) -> None:
    code = getattr(libvirt, names[0])
    for reason, name in _libvirt_names(names[1]).items():
        status = guest_status(code, reason)
        assert status.state is state
        assert status.reason == name


def test_shutdown_and_pmsuspended_states() -> None:
    # Their reason prefixes collide with flag enums in the binding; check them by hand.
    assert guest_status(libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER).reason == (
        "user"
    )
    assert guest_status(libvirt.VIR_DOMAIN_PMSUSPENDED, 0).state is GuestState.PMSUSPENDED


def test_active_states() -> None:
    assert GuestState.RUNNING.active
    assert GuestState.PAUSED.active
    assert GuestState.SHUTDOWN.active
    assert not GuestState.SHUTOFF.active
    assert not GuestState.CRASHED.active


def test_unknown_state_numbers() -> None:
    status = guest_status(77, 3)
    assert status.state is GuestState.NOSTATE
    assert status.reason == "unknown-3"
