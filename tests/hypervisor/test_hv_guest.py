"""Domain operations on the test driver: define, lookup, ownership, state changes, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from lxml import etree

from virtfleet.hypervisor import (
    Guest,
    GuestState,
    Hypervisor,
    HypervisorError,
    InvalidDefinition,
    NotFound,
    StopPath,
    Unsupported,
    connection,
    errors,
)
from virtfleet.identity import METADATA_NAMESPACE

UID = "0b7e2d1c-5a0f-4c6e-9f3e-2a1b3c4d5e6f"


async def test_define_validates_against_schema(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    assert (guest.uuid, guest.name) == (UID, "vm1")
    assert await guest.is_persistent()
    assert (await guest.status()).state is GuestState.SHUTOFF

    bad = domain_xml("vm2").replace("<os>", "<bogus/><os>")
    with pytest.raises(InvalidDefinition, match="bogus"):
        await hv.define(bad)
    assert await hv.lookup_by_name("vm2") is None


async def test_define_is_idempotent_and_updates(hv: Hypervisor, domain_xml: Any) -> None:
    await hv.define(domain_xml("vm1", UID, generation=1))
    guest = await hv.define(domain_xml("vm1", UID, generation=2))
    metadata = await guest.metadata(METADATA_NAMESPACE)
    assert metadata is not None
    assert etree.fromstring(metadata).get("generation") == "2"


@contextlib.contextmanager
def spying_on_defines(
    hv: Hypervisor, refuse_validate: Exception | None = None
) -> Iterator[list[int]]:
    """The flags of every ``defineXMLFlags`` on ``hv``'s connection, in order; with
    ``refuse_validate``, a define asking for ``VIR_DOMAIN_DEFINE_VALIDATE`` raises it."""
    assert hv._reg is not None
    real = hv._reg.conn
    flags_seen: list[int] = []

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def defineXMLFlags(self, xml: str, flags: int) -> Any:  # noqa: N802 - libvirt's name
            flags_seen.append(flags)
            if refuse_validate is not None and flags & libvirt.VIR_DOMAIN_DEFINE_VALIDATE:
                raise refuse_validate
            return real.defineXMLFlags(xml, flags)

    hv._reg.conn = Spy()
    try:
        yield flags_seen
    finally:
        hv._reg.conn = real


async def test_define_checks_the_schema_itself_and_spares_libvirt_the_reparse(
    hv: Hypervisor, domain_xml: Any
) -> None:
    with spying_on_defines(hv) as flags_seen:
        await hv.define(domain_xml("vm1", UID))
        with pytest.raises(InvalidDefinition, match="bogus"):
            await hv.define(domain_xml("vm2").replace("<os>", "<bogus/><os>"))
    assert flags_seen == [0]  # the invalid one never reached libvirt


async def test_define_falls_back_only_when_validate_flag_is_unsupported(
    hv: Hypervisor, domain_xml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host without libvirt's schema file asks libvirt to validate, if it can."""
    monkeypatch.setattr(connection, "check_domain_xml", lambda xml: False)
    assert hv._reg is not None
    # A genuine "unsupported flags" libvirtError from the driver, to replay.
    foreign = hv._reg.conn.lookupByName("foreign-plain")
    try:
        foreign.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError as exc:
        unsupported = exc
    with spying_on_defines(hv, refuse_validate=unsupported) as flags_seen:
        guest = await hv.define(domain_xml("vm1", UID))
    assert guest.uuid == UID
    assert flags_seen == [libvirt.VIR_DOMAIN_DEFINE_VALIDATE, 0]


async def test_lookup(hv: Hypervisor, domain_xml: Any) -> None:
    await hv.define(domain_xml("vm1", UID))
    found = await hv.lookup(UID)
    assert isinstance(found, Guest)
    assert found.name == "vm1"
    assert await hv.lookup("00000000-0000-4000-8000-000000000001") is None
    assert await hv.lookup_by_name("nope") is None
    assert (await hv.lookup_by_name("vm1")) is not None


async def test_list_owned_ignores_foreign_domains(
    hv: Hypervisor, domain_xml: Any, foreign_names: frozenset[str]
) -> None:
    all_names = await hv.call(lambda conn: {d.name() for d in conn.listAllDomains(0)})
    assert foreign_names <= all_names
    assert await hv.list_owned() == []

    a = await hv.define(domain_xml("owned-a", UID, namespace="team", vm_name="a"))
    b = await hv.define(domain_xml("owned-b"))
    await b.start()  # active and inactive domains both count

    owned = await hv.list_owned()
    assert sorted(o.guest.name for o in owned) == ["owned-a", "owned-b"]
    by_name = {o.guest.name: o for o in owned}
    assert by_name["owned-a"].guest.uuid == a.uuid
    assert by_name["owned-a"].attributes == {
        "namespace": "team",
        "name": "a",
        "uid": UID,
        "generation": "1",
    }
    assert not foreign_names & {o.guest.name for o in owned}


async def test_list_owned_with_other_namespace(hv: Hypervisor) -> None:
    owned = await hv.list_owned(metadata_ns="https://example.com/other")
    assert [o.guest.name for o in owned] == ["foreign-other-ns"]


async def test_metadata_absent_is_none(hv: Hypervisor) -> None:
    guest = await hv.lookup_by_name("foreign-plain")
    assert guest is not None
    assert await guest.metadata(METADATA_NAMESPACE) is None


async def test_start_suspend_resume_destroy(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()
    status = await guest.status()
    assert (status.state, status.reason) == (GuestState.RUNNING, "booted")
    assert await guest.is_active()

    await guest.suspend()
    assert (await guest.status()).state is GuestState.PAUSED
    await guest.resume()
    status = await guest.status()
    assert (status.state, status.reason) == (GuestState.RUNNING, "unpaused")

    await guest.destroy()
    status = await guest.status()
    assert (status.state, status.reason) == (GuestState.SHUTOFF, "destroyed")


async def test_start_paused_is_unsupported_on_test_driver(hv: Hypervisor, domain_xml: Any) -> None:
    # testDomainCreateWithFlags accepts no flags; QEMU does (checked in e2e).
    guest = await hv.define(domain_xml("vm1", UID))
    with pytest.raises(Unsupported):
        await guest.start(paused=True)
    assert (await guest.status()).state is GuestState.SHUTOFF


async def test_xml_live_and_inactive(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()
    live = etree.fromstring(await guest.xml())
    inactive = etree.fromstring(await guest.xml(inactive=True))
    assert live.get("id") is not None  # running domains have an id
    assert inactive.get("id") is None
    assert inactive.findtext("uuid") == UID


async def test_set_memory_and_vcpus_live(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID, memory_kib=262144, vcpus=1, max_vcpus=2))
    assert await guest.set_memory(131072) is False  # not running: config only
    await guest.start()
    assert await guest.set_memory(196608) is True
    assert await guest.set_vcpus(2) is True
    with pytest.raises(HypervisorError, match="exceeds maximum"):
        await guest.set_vcpus(4)  # above <vcpu>: needs a redefinition, not a live change
    inactive = etree.fromstring(await guest.xml(inactive=True))
    assert inactive.findtext("currentMemory") == "196608"
    info = await hv.call(lambda conn: conn.lookupByUUIDString(UID).info())
    assert info[2] == 196608


async def test_undefine_keeps_going_when_driver_lacks_flags(
    hv: Hypervisor, domain_xml: Any
) -> None:
    # The test driver rejects NVRAM/CHECKPOINTS flags; undefine retries with fewer.
    guest = await hv.define(domain_xml("vm1", UID))
    await hv.call(
        lambda conn: conn.lookupByUUIDString(UID).snapshotCreateXML(
            "<domainsnapshot><name>s</name></domainsnapshot>", 0
        )
    )
    await guest.undefine()
    assert await hv.lookup(UID) is None


async def test_undefine_missing_domain_raises_not_found(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.undefine()
    with pytest.raises(NotFound):
        await guest.undefine()


async def test_job_progress_unsupported_on_test_driver(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    with pytest.raises(Unsupported):
        await guest.job_progress()


# ----------------------------------------------------------------- graceful stop


async def test_graceful_stop_already_stopped(hv: Hypervisor, domain_xml: Any) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    outcome = await hv.graceful_stop(guest, grace_seconds=5)
    assert outcome.path is StopPath.ALREADY_STOPPED


async def test_graceful_stop_acpi_path(hv: Hypervisor, domain_xml: Any) -> None:
    # The test driver shuts down at once on the (fallback, flag-less) shutdown call.
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()
    outcome = await hv.graceful_stop(guest, grace_seconds=5, poll_interval=0.01)
    assert outcome.path is StopPath.SHUTDOWN
    status = await guest.status()
    assert (status.state, status.reason) == (GuestState.SHUTOFF, "shutdown")


async def test_graceful_stop_destroys_after_grace(
    hv: Hypervisor, domain_xml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()
    requests: list[str] = []

    async def ignored_shutdown() -> None:  # a guest OS that ignores ACPI
        requests.append("acpi")

    monkeypatch.setattr(guest, "shutdown", ignored_shutdown)
    outcome = await hv.graceful_stop(guest, grace_seconds=0.2, poll_interval=0.02)
    assert requests == ["acpi"]
    assert outcome.path is StopPath.DESTROYED_AFTER_GRACE
    assert outcome.waited_seconds >= 0.2
    status = await guest.status()
    assert (status.state, status.reason) == (GuestState.SHUTOFF, "destroyed")


async def test_graceful_stop_destroys_when_the_job_lock_is_stuck(
    hv: Hypervisor, domain_xml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirt kept an ownerless job: no ACPI request gets through, destroy kills QEMU."""
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()

    async def stuck_shutdown() -> None:
        raise errors.JobStuck("Timed out during operation: cannot acquire state change lock")

    monkeypatch.setattr(guest, "shutdown", stuck_shutdown)
    outcome = await hv.graceful_stop(guest, grace_seconds=30, poll_interval=0.02)
    assert outcome.path is StopPath.DESTROYED
    assert outcome.waited_seconds < 5
    assert (await guest.status()).state is GuestState.SHUTOFF


async def test_graceful_stop_guest_stops_late_within_grace(
    hv: Hypervisor, domain_xml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()
    real_shutdown = guest.shutdown

    async def slow_shutdown() -> None:
        async def later() -> None:
            await asyncio.sleep(0.1)
            await real_shutdown()

        asyncio.get_running_loop().create_task(later())

    monkeypatch.setattr(guest, "shutdown", slow_shutdown)
    outcome = await hv.graceful_stop(guest, grace_seconds=5, poll_interval=0.02)
    assert outcome.path is StopPath.SHUTDOWN
    assert 0.1 <= outcome.waited_seconds < 5


async def test_graceful_stop_zero_grace_and_paused_destroy_at_once(
    hv: Hypervisor, domain_xml: Any
) -> None:
    guest = await hv.define(domain_xml("vm1", UID))
    await guest.start()
    assert (await hv.graceful_stop(guest, grace_seconds=0)).path is StopPath.DESTROYED
    await guest.start()
    await guest.suspend()
    outcome = await hv.graceful_stop(guest, grace_seconds=30)
    assert outcome.path is StopPath.DESTROYED
    assert outcome.waited_seconds < 5
