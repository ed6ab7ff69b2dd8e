"""The agent's driver on libvirt's test driver: observe → decide → act until converged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from virtfleet.agent.driver import ActionError, NodeDriver, power_of
from virtfleet.agent.seed import build_iso, seed_files
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.volumes import volume_name
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineSpec, VirtualMachineStatus
from virtfleet.hypervisor import GuestState, Hypervisor, storage
from virtfleet.reconcile.vm import Decision, Power, StopCause, VmView, decide

UID = "11111111-2222-4333-8444-555555555555"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def driver(hv: Hypervisor) -> NodeDriver:
    return NodeDriver(hv, AgentSettings(node_name="node-a", serial_log_dir="/serial"))


def vm(status: VirtualMachineStatus | None = None, generation: int = 1, **spec: Any) -> VmView:
    return VmView(
        namespace="ns",
        name="vm",
        uid=UID,
        generation=generation,
        node="node-a",
        spec=VirtualMachineSpec.model_validate(
            {
                "memory": {"size": "64Mi"},
                "kernel": {"image": "guest-vmlinuz", "cmdline": "console=ttyS0"},
                "disks": [{"name": "data", "size": "16Mi", "source": {"blank": {}}}],
                **spec,
            }
        ),
        status=status or VirtualMachineStatus(),
    )


async def converge(driver: NodeDriver, view: VmView, passes: int = 4) -> tuple[Decision, VmView]:
    """What the agent's reconcile loop does: decide, act, look again until nothing to do."""
    for _ in range(passes):
        snap = await driver.observe(view)
        decision = decide(view, snap.observed, NOW)
        view = VmView(**{**view.__dict__, "status": decision.status})
        if not decision.actions:
            return decision, view
        for action in decision.actions:
            await driver.execute(view, snap, action)
    raise AssertionError("did not converge")


async def test_new_vm_converges_to_a_running_domain(driver: NodeDriver, hv: Hypervisor) -> None:
    decision, _ = await converge(driver, vm())
    assert decision.status.printable_status is PrintableStatus.RUNNING
    guest = await hv.lookup(UID)
    assert guest is not None
    assert (await guest.status()).state is GuestState.RUNNING
    volume = await storage.lookup_volume(hv, "virtfleet-local", volume_name(UID, "data"))
    assert volume is not None
    assert volume.capacity == 16 * 2**20


async def test_second_pass_changes_nothing(driver: NodeDriver) -> None:
    _, view = await converge(driver, vm())
    snap = await driver.observe(view)
    assert snap.observed.drift == ()
    assert snap.observed.marker_current
    assert decide(view, snap.observed, NOW).actions == ()


async def test_spec_change_redefines_and_requires_restart(driver: NodeDriver) -> None:
    _, view = await converge(driver, vm())
    changed = vm(status=view.status, generation=2, memory={"size": "96Mi"})
    decision, view = await converge(driver, changed)
    restart = next(c for c in decision.status.conditions if c.type == "RestartRequired")
    assert "memory.size" in restart.message
    snap = await driver.observe(view)
    assert snap.observed.drift == ()  # the persistent definition already has it


async def test_deletion_leaves_nothing(driver: NodeDriver, hv: Hypervisor) -> None:
    _, view = await converge(driver, vm())
    deleting = VmView(**{**view.__dict__, "deleting": True})
    snap = await driver.observe(deleting)
    decision = decide(deleting, snap.observed, NOW)
    for action in decision.actions:
        await driver.execute(deleting, snap, action)
    assert await hv.lookup(UID) is None
    assert await storage.list_volumes(hv, "virtfleet-local") == []


async def test_vm_with_a_missing_image_can_still_be_deleted(driver: NodeDriver) -> None:
    broken = vm(kernel={"image": "nope"})
    deleting = VmView(**{**broken.__dict__, "deleting": True})
    snap = await driver.observe(deleting)
    decision = decide(deleting, snap.observed, NOW)
    assert decision.finalized


async def test_unknown_image_is_a_permanent_error(driver: NodeDriver) -> None:
    with pytest.raises(ActionError) as err:
        await driver.observe(vm(kernel={"image": "nope"}))
    assert err.value.permanent
    assert err.value.reason == "ImageNotFound"
    assert "node-a" in err.value.message


async def test_unknown_pool_is_a_permanent_error(driver: NodeDriver) -> None:
    spec: dict[str, Any] = {
        "disks": [{"name": "d", "size": "1Mi", "pool": "other", "source": {"blank": {}}}]
    }
    with pytest.raises(ActionError, match="not one of this node's pools"):
        await driver.observe(vm(**spec))


def test_stop_causes_follow_libvirt_reasons() -> None:
    assert power_of(GuestState.SHUTOFF, "shutdown") == (Power.STOPPED, StopCause.GUEST)
    assert power_of(GuestState.SHUTOFF, "destroyed") == (Power.STOPPED, StopCause.DESTROYED)
    assert power_of(GuestState.RUNNING, "booted") == (Power.RUNNING, StopCause.NONE)
    assert power_of(GuestState.SHUTDOWN, "user")[0] is Power.STOPPING


def test_seed_iso_carries_the_nocloud_files() -> None:
    files = seed_files(uid=UID, hostname="vm", user_data="#cloud-config\n", network_data="v: 2\n")
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    assert UID.encode() in files["meta-data"]
    iso = build_iso(files)
    assert iso[0x8001:0x8006] == b"CD001"  # ISO 9660 primary volume descriptor
    assert b"CIDATA" in iso[0x8000:0x8800].upper()
