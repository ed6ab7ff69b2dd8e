"""The watchdog device protocol on a file (as the harness simulates it): each pet writes a
byte, the magic close writes 'V' and closes."""

from __future__ import annotations

import os
from pathlib import Path

from virtfleet.agent.fencing import Watchdog, high_availability


def test_pet_keeps_one_byte_and_the_magic_close_disarms(tmp_path: Path) -> None:
    device = tmp_path / "watchdog"
    dog = Watchdog(str(device))
    assert not dog.armed
    dog.pet()
    dog.pet()
    assert dog.armed
    assert device.read_bytes() == b"\0"
    before = device.stat().st_mtime_ns
    os.utime(device, ns=(before - 10**9, before - 10**9))
    dog.pet()
    assert device.stat().st_mtime_ns > before - 10**9
    dog.disarm()
    assert not dog.armed
    assert device.read_bytes() == b"V"
    dog.disarm()  # idempotent


def test_policy_of_a_cached_vm() -> None:
    assert high_availability(None).value == "None"
    assert high_availability({"spec": {"highAvailability": "Restart"}}).value == "Restart"
    assert high_availability({"spec": {"highAvailability": "bogus"}}).value == "None"
