"""The source agent's migration jobs against two libvirt test-driver nodes and a fake API.

``migrateToURI3`` does not exist in libvirt's test driver, so the job itself is played by
a stand-in that moves the domain the way libvirt does (``PERSIST_DEST |
UNDEFINE_SOURCE``), fails, or waits for an abort; everything around it — refusals,
adoption, the target's volumes, progress, the completion timeout, post-copy, cancel,
the hand-over, the offline copy and the recovery after a restart — is the real code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import owned_domain_xml

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.migration import MigrationAgent
from virtfleet.agent.migration import handoff as handoff_module
from virtfleet.agent.migration import live as live_module
from virtfleet.agent.settings import AgentSettings
from virtfleet.domain.jobs import JobProgress, JobType
from virtfleet.hypervisor import Guest, Hypervisor, HypervisorSettings, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.hypervisor import migration as hv_migration
from virtfleet.identity import NODE_LABEL, Key, node_finalizer
from virtfleet.logs import get_logger
from virtfleet.reconcile.migration_job import RECOVERY_RETRY_SECONDS

SOURCE, TARGET = "node-a", "node-b"
UID = "00000000-0000-4000-8000-00000000a001"
KEY: Key = ("ns", "m1")
VM_KEY: Key = ("ns", "vm1")
LOCAL = "virtfleet-local"
VOLUME = f"{UID}-data.qcow2"


async def node(tmp_path: Path, name: str) -> Hypervisor:
    xml = tmp_path / f"{name}.xml"
    xml.write_text("<node/>")
    hv = Hypervisor(HypervisorSettings(uri=f"test://{xml}", executor_workers=2))
    await hv.open()
    await storage.ensure_pool(hv, "virtfleet-images", f"/{name}/images")
    await storage.ensure_pool(hv, LOCAL, f"/{name}/local")
    return hv


class Fleet:
    """Two nodes, the API, and the source's migration loop."""

    def __init__(self, source: Hypervisor, target: Hypervisor, kube: FakeKube) -> None:
        self.source, self.target, self.kube = source, target, kube
        self.agent = Agent(AgentSettings(node_name=SOURCE), source, kube)
        self.snapshots: dict[Key, dict[str, Any]] = {}
        snaps: Any = type("Snaps", (), {"snapshots": self.snapshots, "restores": {}})()
        self.migrations = MigrationAgent(self.agent, VmLocks(), snaps)
        self.migrations.ctx.target = lambda uri: self.target  # type: ignore[method-assign]
        self.closed = 0

        async def close(target: Hypervisor) -> None:
            self.closed += 1

        self.migrations.ctx.close_target = close  # type: ignore[method-assign]

    async def vm(self, *, running: bool = True, **spec: Any) -> Guest:
        body = {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {
                "name": "vm1",
                "namespace": "ns",
                "uid": UID,
                "labels": {NODE_LABEL: SOURCE},
                "finalizers": [node_finalizer(SOURCE)],
            },
            "spec": {
                "memory": {"size": "64Mi"},
                "disks": [{"name": "data", "size": "1Mi", "source": {"blank": {}}}],
                **spec,
            },
            "status": {"nodeName": SOURCE, "printableStatus": "Running"},
        }
        self.agent.cache[VM_KEY] = self.kube.put("VirtualMachine", body)
        guest = await self.source.define(
            owned_domain_xml("ns_vm1", UID, namespace="ns", vm_name="vm1")
        )
        if running:
            await guest.start()
        await storage.create_blank(self.source, LOCAL, VOLUME, 2**20)
        return guest

    def host(self, uri: str | None = "test:///target") -> None:
        status = {} if uri is None else {"migrationURI": uri}
        self.kube.put("VMHost", {"metadata": {"name": TARGET}, "status": status})

    def migration(self, phase: str = "Scheduled", **spec: Any) -> None:
        body = {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMMigration",
            "metadata": {"name": "m1", "namespace": "ns", "uid": "m-1", "generation": 1},
            "spec": {"vmName": "vm1", "targetNode": TARGET, **spec},
            "status": {"phase": phase, "sourceNode": SOURCE, "targetNode": TARGET},
        }
        self.migrations.on_event("ADDED", self.kube.put("VMMigration", body))

    def status(self) -> dict[str, Any]:
        return dict(self.kube.get_now("VMMigration", *KEY).get("status") or {})

    def vm_body(self) -> dict[str, Any]:
        return self.kube.get_now("VirtualMachine", *VM_KEY)


@pytest.fixture
async def fleet(hv: Hypervisor, tmp_path: Path) -> AsyncIterator[Fleet]:
    del hv  # the shared fixture's node is not used: two of our own
    source, target = await node(tmp_path, "a"), await node(tmp_path, "b")
    try:
        yield Fleet(source, target, FakeKube())
    finally:
        await source.close()
        await target.close()


def moves_the_domain(fleet: Fleet) -> Callable[..., Any]:
    """A stand-in for ``migrateToURI3`` that succeeds like libvirt does."""

    async def migrate(guest: Guest, request: hv_migration.MigrationRequest) -> None:
        xml = await guest.xml(inactive=True)
        await guest.destroy()
        await guest.undefine()
        moved = await fleet.target.define(xml)
        await moved.start()

    return migrate


async def test_a_live_migration_hands_the_vm_to_the_target(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.vm()
    fleet.host()
    fleet.migration()
    monkeypatch.setattr(hv_migration, "migrate", moves_the_domain(fleet))
    assert await fleet.migrations.reconcile(KEY) is None

    status = fleet.status()
    assert status["phase"] == "Succeeded", status["failureReason"]
    assert status["progress"]["percent"] == 100
    vm = fleet.vm_body()
    assert vm["status"]["nodeName"] == TARGET
    assert vm["metadata"]["labels"][NODE_LABEL] == TARGET
    assert vm["metadata"]["finalizers"] == [node_finalizer(TARGET)]
    # The target got the node-local volume first; the source's copy is gone after.
    assert await storage.lookup_volume(fleet.target, LOCAL, VOLUME) is not None
    assert await storage.lookup_volume(fleet.source, LOCAL, VOLUME) is None
    assert await fleet.source.lookup(UID) is None
    assert VM_KEY not in fleet.agent.cache  # forgotten here
    migration = fleet.kube.get_now("VMMigration", *KEY)
    assert migration["metadata"]["labels"][NODE_LABEL] == SOURCE  # adopted before it ran
    assert fleet.migrations.jobs == {}
    assert fleet.closed == 1


async def test_a_failed_job_leaves_the_vm_running_on_the_source(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.vm()
    fleet.host()
    fleet.migration()

    async def fails(*_: Any) -> None:
        raise hv_errors.HypervisorError("operation failed: migration job: unexpectedly failed")

    monkeypatch.setattr(hv_migration, "migrate", fails)
    await fleet.migrations.reconcile(KEY)
    status = fleet.status()
    assert status["phase"] == "Failed"
    assert status["failureReason"].startswith("MigrationFailed: operation failed")
    assert fleet.vm_body()["status"]["nodeName"] == SOURCE
    assert (await (await fleet.source.lookup(UID)).status()).state.active  # type: ignore[union-attr]
    assert VM_KEY in fleet.agent.queue._dirty  # released: the VM loop looks again


def waits_for_abort(fleet: Fleet, aborted: asyncio.Event) -> Callable[..., Any]:
    async def migrate(*_: Any) -> None:
        await aborted.wait()
        raise hv_errors.HypervisorError("operation aborted: migration job: canceled by client")

    return migrate


async def test_the_completion_timeout_aborts_the_job(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.vm()
    fleet.host()
    fleet.migration(policy={"completionTimeoutPerGiB": 1})  # 65 MiB → 0.06 s
    aborted = asyncio.Event()
    monkeypatch.setattr(hv_migration, "migrate", waits_for_abort(fleet, aborted))

    async def abort(_: Guest) -> None:
        aborted.set()

    monkeypatch.setattr(hv_migration, "abort", abort)
    await asyncio.wait_for(fleet.migrations.reconcile(KEY), 10)
    status = fleet.status()
    assert status["phase"] == "Failed"
    assert status["failureReason"].startswith("CompletionTimeout: completion timeout of 0.06s")


async def test_a_stalled_pre_copy_switches_to_post_copy_and_a_failure_loses_the_guest(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.vm()
    fleet.host()
    fleet.migration(policy={"postCopy": True})
    monkeypatch.setattr(live_module, "poll_interval", lambda _: 0.01)
    switched = asyncio.Event()
    iterations = iter(range(1, 100))

    async def progress(_: Guest) -> JobProgress:
        return JobProgress(
            type=JobType.UNBOUNDED,
            memory_iteration=next(iterations),
            memory_remaining=800,
            data_total=1000,
            data_processed=200,
            data_remaining=800,
        )

    async def post_copy(_: Guest) -> None:
        switched.set()

    async def migrate(*_: Any) -> None:
        await switched.wait()
        raise hv_errors.HypervisorError("internal error: qemu unexpectedly closed the monitor")

    monkeypatch.setattr(Guest, "job_progress", progress)
    monkeypatch.setattr(hv_migration, "start_post_copy", post_copy)
    monkeypatch.setattr(hv_migration, "migrate", migrate)
    await asyncio.wait_for(fleet.migrations.reconcile(KEY), 10)
    status = fleet.status()
    assert status["failureReason"].startswith("PostCopyFailed: ")
    assert fleet.vm_body()["status"]["printableStatus"] == "Failed"
    # The VM loop is held off this VM until the VMMigration goes.
    calls: list[Key] = []

    async def vm_loop(key: Key) -> float | None:
        calls.append(key)
        return None

    assert await fleet.migrations.guard(vm_loop)(VM_KEY) is None
    assert calls == []


async def test_deleting_the_vmmigration_cancels_the_running_job(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.vm()
    fleet.host()
    fleet.migration()
    aborted = asyncio.Event()
    monkeypatch.setattr(hv_migration, "migrate", waits_for_abort(fleet, aborted))

    async def abort(_: Guest) -> None:
        aborted.set()

    monkeypatch.setattr(hv_migration, "abort", abort)
    job = asyncio.create_task(fleet.migrations.reconcile(KEY))
    for _ in range(200):
        if KEY in fleet.migrations.jobs:
            break
        await asyncio.sleep(0.01)
    assert await fleet.migrations.cancel(KEY, 5.0) is True
    await job
    status = fleet.status()
    assert status["phase"] == "Cancelled"
    assert status["failureReason"] == "Cancelled: deleted while running"
    assert fleet.migrations.bookkeeping()["migration_jobs"] == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("stopped", "VMNotRunning"),
        ("no-host", "TargetUnavailable"),
        ("no-uri", "TargetUnavailable"),
        ("snapshot", "SnapshotsBlockMigration"),
        ("foreign", "VMNotOnSource"),
    ],
)
async def test_refusals_change_nothing_and_say_why(fleet: Fleet, case: str, reason: str) -> None:
    await fleet.vm(running=case != "stopped")
    if case == "no-uri":
        fleet.host(None)
    elif case != "no-host":
        fleet.host()
    if case == "snapshot":
        fleet.snapshots[("ns", "s1")] = {
            "spec": {"vmName": "vm1"},
            "status": {"phase": "InProgress"},
        }
    if case == "foreign":
        body = fleet.kube.get_now("VirtualMachine", *VM_KEY)
        body["metadata"]["labels"][NODE_LABEL] = TARGET
        fleet.agent.cache[VM_KEY] = fleet.kube.put("VirtualMachine", body)
        fleet.kube.delete_now("VirtualMachine", *VM_KEY)
    fleet.migration()
    assert await fleet.migrations.reconcile(KEY) is None
    status = fleet.status()
    assert status["phase"] == "Failed"
    assert status["failureReason"].startswith(f"{reason}: ")
    assert await storage.lookup_volume(fleet.target, LOCAL, VOLUME) is None


async def copied(*_: Any) -> int:
    """The byte copy (volume download/upload streams) is not in the test driver."""
    return 2**20


async def test_an_offline_migration_copies_the_volumes_and_defines_the_vm_there(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = await fleet.vm()
    fleet.host()
    fleet.migration(mode="Offline")
    monkeypatch.setattr(storage, "copy_volume", copied)
    assert await fleet.migrations.reconcile(KEY) is None
    assert fleet.status()["phase"] == "Succeeded", fleet.status().get("failureReason")
    moved = await fleet.target.lookup(UID)
    assert moved is not None
    assert not (await moved.status()).state.active  # the target's VM loop starts it
    assert await fleet.source.lookup(UID) is None
    assert fleet.vm_body()["status"] == {"nodeName": TARGET, "printableStatus": "Stopped"}
    del guest


async def test_a_cancelled_offline_migration_removes_what_it_made_on_the_target(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.vm()
    fleet.host()
    fleet.migration(mode="Offline")

    async def copy_then_cancel(*args: Any) -> int:
        fleet.migrations.jobs[KEY].state.cancelled = True
        return await copied(*args)

    monkeypatch.setattr(storage, "copy_volume", copy_then_cancel)
    await fleet.migrations.reconcile(KEY)
    assert fleet.status()["phase"] == "Cancelled", fleet.status()["failureReason"]
    assert await storage.lookup_volume(fleet.target, LOCAL, VOLUME) is None
    assert await fleet.source.lookup(UID) is not None  # the VM stays (stopped) here


async def copy_running_on_target(fleet: Fleet, guest: Guest, *, volume: bool = True) -> None:
    """What libvirt leaves when the source's Finish3 call is lost: the target's copy
    runs (with its volume, which a job's preparation made), the source was resumed."""
    xml = await guest.xml(inactive=True)
    await (await fleet.target.define(xml)).start()
    if volume:
        await storage.create_blank(fleet.target, LOCAL, VOLUME, 2**20)


async def test_a_job_that_leaves_the_guest_running_on_both_nodes_keeps_the_source(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = await fleet.vm()
    fleet.host()
    fleet.migration()

    async def split(*_: Any) -> None:
        await copy_running_on_target(fleet, guest, volume=False)
        raise hv_errors.HypervisorError("operation failed: Finish3: connection reset")

    monkeypatch.setattr(hv_migration, "migrate", split)
    await fleet.migrations.reconcile(KEY)
    status = fleet.status()
    assert status["phase"] == "Failed"
    assert status["failureReason"].startswith("MigrationFailed: operation failed: Finish3")
    assert "the target's copy was destroyed" in status["failureReason"]
    assert await fleet.target.lookup(UID) is None
    assert await storage.lookup_volume(fleet.target, LOCAL, VOLUME) is None
    assert (await guest.status()).state.active  # the source keeps the guest
    assert fleet.vm_body()["status"]["nodeName"] == SOURCE
    assert VM_KEY in fleet.agent.queue._dirty


async def test_a_restart_finding_the_guest_running_on_both_nodes_keeps_the_source(
    fleet: Fleet,
) -> None:
    guest = await fleet.vm()
    fleet.host()
    await copy_running_on_target(fleet, guest)
    fleet.migration("Running")
    delay = await fleet.migrations.reconcile(KEY)
    assert (delay, fleet.status()["phase"]) == (None, "Failed")
    assert fleet.status()["failureReason"].startswith("Interrupted: ")
    assert await fleet.target.lookup(UID) is None
    assert (await guest.status()).state.active


async def test_a_split_after_the_hand_over_committed_keeps_the_targets_copy(
    fleet: Fleet,
) -> None:
    """The VM already names the target (the hand-over's first write landed) when a
    restarted source libvirtd resumed its paused copy: the source's copy goes."""
    guest = await fleet.vm()
    fleet.host()
    await copy_running_on_target(fleet, guest)
    await fleet.kube.patch_status("VirtualMachine", *VM_KEY, {"nodeName": TARGET})
    fleet.migration("Running")
    delay = await fleet.migrations.reconcile(KEY)
    assert (delay, fleet.status()["phase"]) == (None, "Succeeded")
    assert await fleet.source.lookup(UID) is None
    target_copy = await fleet.target.lookup(UID)
    assert target_copy is not None
    assert (await target_copy.status()).state.active


async def test_the_migration_stays_running_while_the_source_copy_cannot_be_removed(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source libvirtd that cannot be asked may resume its copy when it comes back: the
    VM already names the target (so a later split goes to it), but the migration is not
    called done until the copy here is gone (found with chaos seed 1131364337)."""
    await fleet.vm()
    fleet.host()
    fleet.migration()
    monkeypatch.setattr(hv_migration, "migrate", moves_the_domain(fleet))
    real_remove = handoff_module.remove_source_leftover
    calls = {"n": 0}

    async def unreachable_once(*args: Any) -> bool:
        calls["n"] += 1
        return False if calls["n"] == 1 else await real_remove(*args)

    monkeypatch.setattr(handoff_module, "remove_source_leftover", unreachable_once)
    await fleet.migrations.reconcile(KEY)
    assert fleet.status()["phase"] == "Running"
    assert fleet.vm_body()["status"]["nodeName"] == TARGET  # the API names the target
    assert KEY in fleet.migrations.queue._dirty  # the recovery looks again
    delay = await fleet.migrations.reconcile(KEY)
    assert (delay, fleet.status()["phase"]) == (None, "Succeeded")
    assert calls["n"] == 2


async def test_a_source_libvirtd_that_cannot_be_asked_keeps_the_hand_over_open(
    hv: Hypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent: Any = type(
        "A", (), {"kube": None, "hv": hv, "settings": AgentSettings(node_name=SOURCE)}
    )
    ctx = MigrationAgent(agent, VmLocks(), None).ctx  # type: ignore[arg-type]

    async def lost(uid: str) -> Guest | None:
        raise hv_errors.ConnectionLost("not connected to node-a")

    monkeypatch.setattr(hv, "lookup", lost)
    assert not await handoff_module.remove_source_leftover(ctx, UID, get_logger("test"))


@pytest.mark.parametrize("where", ["target", "source", "neither"])
async def test_a_restart_mid_job_is_recovered_by_where_the_domain_runs(
    fleet: Fleet, where: str
) -> None:
    guest = await fleet.vm()
    fleet.host()
    if where == "target":
        xml = await guest.xml(inactive=True)
        await guest.destroy()
        await guest.undefine()
        await (await fleet.target.define(xml)).start()
    elif where == "neither":
        await guest.destroy()
        await guest.undefine()
    fleet.migration("Running")
    delay = await fleet.migrations.reconcile(KEY)
    phase = fleet.status()["phase"]
    if where == "target":
        assert (delay, phase) == (None, "Succeeded")
        assert fleet.vm_body()["status"]["nodeName"] == TARGET
    elif where == "source":
        assert (delay, phase) == (None, "Failed")
        assert fleet.status()["failureReason"].startswith("Interrupted: ")
    else:
        assert delay == RECOVERY_RETRY_SECONDS
        assert phase == "Running"
