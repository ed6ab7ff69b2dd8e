"""Everything the agent keeps per VM (or per snapshot, restore, migration) goes with it.

Churn creates and deletes thousands of objects on a node: one structure that keeps an
entry per object ever seen is a leak. Each test proves one structure is empty again
once its object is gone, counted the way the agent's bookkeeping log counts it.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from testkit.kube import FakeKube
from virtfleet.agent import handlers
from virtfleet.agent import migration as migration_loops
from virtfleet.agent.agent import Agent
from virtfleet.agent.bookkeeping import PER_OBJECT, BookkeepingLog
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.migration import loop as migration_loop
from virtfleet.agent.migration.jobs import RunningJob
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.snapshot import agent as snapshot_loops
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor import migration as hv_migration
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.migration_job import JobState
from virtfleet.reconcile.snapshot_types import DomainFacts
from virtfleet.reconcile.vm import Undefine
from virtfleet.runtime import apisession
from virtfleet.runtime.kube import KubeClient
from virtfleet.runtime.queue import WorkQueue

NODE = "node-a"
KEY = ("ns", "web")
UID = "11111111-2222-4333-8444-555555555555"


def vm_body(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": KEY[0],
            "name": KEY[1],
            "uid": UID,
            "generation": 1,
            "labels": {NODE_LABEL: NODE},
        },
        "spec": {"memory": {"size": "16Mi"}, "terminationGracePeriodSeconds": 0, **spec},
        "status": {"nodeName": NODE},
    }


def per_object(counts: Mapping[str, int]) -> dict[str, int]:
    return {name: value for name, value in counts.items() if name in PER_OBJECT and value}


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_deleted_vm_leaves_no_per_vm_state_anywhere(hv: Hypervisor) -> None:
    kube = FakeKube(keyed_by_name=True)
    agent = Agent(AgentSettings(node_name=NODE), hv, kube)
    locks = VmLocks()
    snaps, tasks = snapshot_loops.start(agent, locks)
    migrations = migration_loops.MigrationAgent(agent, locks, snaps)
    books = handlers._bookkeeping(agent, locks, {"snapshots": snaps, "migrations": migrations})
    tasks.append(asyncio.create_task(agent.queue.run(locks.guard(agent.reconcile))))
    try:
        agent.on_vm_event("ADDED", kube.put("VirtualMachine", vm_body()))
        await eventually(
            lambda: kube.objects[KEY].get("status", {}).get("printableStatus") == "Running"
        )
        # Restores are queued per VM: a retry pending when the VM goes must go with it.
        snaps.restore_queue.add_after(KEY, 30.0)
        assert per_object(books.check())["restore_queue"] == 1

        # The VM's DELETED event arrives while its last reconcile still runs (the kopf
        # handler saw the domain go and released the finalizer): that reconcile must
        # not leave a finalization event behind.
        execute = agent.driver.execute

        async def undefine_then_deleted(vm: Any, observation: Any, action: Any) -> None:
            await execute(vm, observation, action)
            if isinstance(action, Undefine):
                agent.on_vm_event("DELETED", kube.objects.pop(KEY))

        agent.driver.execute = undefine_then_deleted  # type: ignore[method-assign]
        deleting = copy.deepcopy(kube.objects[KEY])
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        agent.on_vm_event("MODIFIED", kube.put("VirtualMachine", deleting))
        await eventually(lambda: KEY not in kube.objects and not per_object(books.check()))
        assert await hv.lookup(UID) is None
        assert per_object(books.check()) == {}
    finally:
        await agent.queue.stop()
        await snapshot_loops.stop(snaps)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_vm_lock_lives_only_while_held_or_awaited() -> None:
    locks = VmLocks()
    async with locks.lock(KEY):
        waiter = asyncio.create_task(_hold(locks))
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(_hold(locks))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert len(locks) == 1  # the holder and the first waiter still use it
    await waiter
    assert len(locks) == 0


async def _hold(locks: VmLocks) -> None:
    async with locks.lock(KEY):
        await asyncio.sleep(0)


async def test_a_deleted_snapshot_leaves_no_finalization_event(hv: Hypervisor) -> None:
    agent = Agent(AgentSettings(node_name=NODE), hv, FakeKube())
    snaps = snapshot_loops.SnapshotAgent(agent, VmLocks())
    body = {
        "metadata": {
            "namespace": "ns",
            "name": "s1",
            "uid": "00000000-0000-4000-8000-000000000001",
            "labels": {NODE_LABEL: NODE},
            "deletionTimestamp": "2026-01-01T00:00:00Z",
            "resourceVersion": "7",
        },
        "spec": {"vmName": "gone"},
    }
    snaps.on_snapshot_event("MODIFIED", body)
    # Its DELETED event arrives while the deletion's reconcile looks at libvirt.

    async def observe(*_: Any, **__: Any) -> tuple[DomainFacts, None]:
        snaps.on_snapshot_event("DELETED", body)
        return DomainFacts(defined=False), None

    snaps.observe = observe  # type: ignore[method-assign]
    assert await snaps.reconcile_snapshot(("ns", "s1")) is None
    assert (snaps.snapshots, snaps.finalized) == ({}, {})

    # A deletion handler that waited for it: its event goes with the DELETED event.
    snaps.on_snapshot_event("MODIFIED", body)
    snaps.finalized.setdefault(("ns", "s1"), asyncio.Event()).set()
    snaps.on_snapshot_event("DELETED", body)
    assert (snaps.snapshots, snaps.finalized) == ({}, {})
    assert snaps.snapshot_queue.failures(("ns", "s1")) == 0


async def test_a_cancelled_migration_job_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def abort(_: Any) -> None:
        return None

    monkeypatch.setattr(hv_migration, "abort", abort)
    agent = Agent(AgentSettings(node_name=NODE), Hypervisor(), FakeKube())
    migrations = migration_loops.MigrationAgent(agent, VmLocks(), None)  # type: ignore[arg-type]
    key = ("ns", "m1")
    migrations.jobs[key] = RunningJob(guest=object(), state=JobState(timed_out_budget=20.0))  # type: ignore[arg-type]
    cancel = asyncio.create_task(migrations.cancel(key, 5.0))
    await asyncio.sleep(0.01)
    assert per_object(migrations.bookkeeping()) != {}
    migrations._job_ended(key)  # what the job's `finally` does
    assert await cancel is True
    assert per_object(migrations.bookkeeping()) == {}


async def test_event_aggregation_locks_go_when_the_event_is_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = KubeClient(kopf.ConnectionInfo(server="https://127.0.0.1:1"))
    written: list[str] = []

    async def record(key: tuple[str, str], *_: Any) -> None:
        await asyncio.sleep(0.01)
        written.append(key[1])

    monkeypatch.setattr(kube, "_record_event", record)
    try:
        ref = {"kind": "VirtualMachine", "metadata": {"namespace": "ns", "name": "web", "uid": UID}}
        await asyncio.gather(
            *(kube.record_event(ref, "Normal", "Started", "started", "agent") for _ in range(3))
        )
        assert len(written) == 3
        assert kube.bookkeeping()["event_locks"] == 0
    finally:
        await kube.close()


async def test_queue_state_of_a_forgotten_key_is_gone() -> None:
    queue: WorkQueue[str] = WorkQueue(name="t")
    queue.add_after("vm", 60.0)
    assert queue.tracked == 1
    queue.forget("vm")
    assert queue.tracked == 0


def test_bookkeeping_is_logged_only_when_it_changed() -> None:
    counts = {"vms": 1}
    books = BookkeepingLog(lambda: counts, NODE)
    logged: list[dict[str, Any]] = []
    books.log = _Recorder(logged)  # type: ignore[assignment]
    books.check()
    books.check()
    counts["vms"] = 0
    books.check()
    assert [entry["counts"] for entry in logged] == [{"vms": 1}, {"vms": 0}]


class _Recorder:
    def __init__(self, out: list[dict[str, Any]]) -> None:
        self.out = out

    def info(self, _event: str, **fields: Any) -> None:
        self.out.append(fields)

    warning = info


async def test_kopfs_session_gets_a_bounded_connection_pool() -> None:
    info = kopf.ConnectionInfo(server="https://127.0.0.1:1", insecure=True, token="t")
    context = apisession.bounded_session(info)
    try:
        assert context.server == info.server
        assert context.aiohttp_session.connector is not None
        assert context.aiohttp_session.connector.limit == apisession.MAX_CONNECTIONS
        assert context.aiohttp_session.headers["Authorization"] == "Bearer t"
    finally:
        await context.aiohttp_session.close()


async def test_the_agent_waits_for_a_restarting_libvirtd_instead_of_failing_its_startup(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kopf retries a failed startup only a minute later: the agent sat idle that long.
    import libvirt

    from virtfleet.hypervisor import HypervisorSettings
    from virtfleet.hypervisor.errors import ConnectionLost

    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    refusals = 3

    def connect(uri: str, readonly: bool) -> Any:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise ConnectionLost("unable to connect to server: Connection refused")
        return libvirt.open(uri)

    monkeypatch.setattr(handlers, "backoff_delays", lambda *_: iter(lambda: 0.01, None))
    hv = Hypervisor(HypervisorSettings(uri=f"test://{node}"), connect=connect)
    await asyncio.wait_for(handlers._open_when_libvirtd_answers(hv, _Recorder([])), 5)
    try:
        assert hv.connected
        assert refusals == 0
    finally:
        await hv.close()


async def test_a_migration_waits_while_the_vm_cache_is_behind_the_api() -> None:
    # Right after a restart the VMMigration watch can deliver before the VM watch.
    kube = FakeKube(keyed_by_name=True)
    kube.put("VirtualMachine", vm_body())
    agent = Agent(AgentSettings(node_name=NODE), Hypervisor(), kube)
    migrations = migration_loops.MigrationAgent(agent, VmLocks(), None)  # type: ignore[arg-type]
    key = ("ns", "m1")
    migrations.cache[key] = {
        "metadata": {"namespace": "ns", "name": "m1", "resourceVersion": "3"},
        "spec": {"vmName": KEY[1], "targetNode": "node-b"},
        "status": {"phase": "Scheduled", "sourceNode": NODE, "targetNode": "node-b"},
    }
    assert await migrations.reconcile(key) == migration_loop.CACHE_BEHIND_RETRY_SECONDS
    del kube.objects[KEY]  # gone from the API as well: refused, not retried
    assert await migrations.reconcile(key) is None


async def test_a_snapshot_of_a_busy_vm_gives_its_worker_back(hv: Hypervisor) -> None:
    # Waiting for the VM's lock held one of the snapshot queue's 4 workers: the snapshots
    # of one VM whose libvirt calls hang (a stuck job) starved every other VM's.
    locks = VmLocks()
    agent = Agent(AgentSettings(node_name=NODE), hv, FakeKube())
    snaps = snapshot_loops.SnapshotAgent(agent, locks)
    body = {
        "metadata": {"namespace": "ns", "name": "s1", "uid": "u", "resourceVersion": "1"},
        "spec": {"vmName": KEY[1]},
    }
    snaps.on_snapshot_event("ADDED", body)
    async with locks.lock(KEY):
        assert await asyncio.wait_for(snaps.reconcile_snapshot(("ns", "s1")), 1) == (
            snapshot_loops.BUSY_RETRY_SECONDS
        )
    assert await snaps.reconcile_snapshot(("ns", "s1")) is None  # free: the VM is not here
