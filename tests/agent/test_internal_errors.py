"""No agent loop leaves an object silent: an unexpected error is a condition and an Event.

Each loop runs in its real work queue on the test driver with an in-memory API; one of its
pure decisions is made to raise what no rule maps to a reason. The object must then say
``Stalled=True``/``Ready=False`` (``InternalError``, with the error's class and message),
carry a Warning Event, and the key must be retried with backoff — and the next pass that
works clears the condition. Known inputs that used to escape (a non-UTF-8 Secret, a
Secret the agent may not read) have reasons of their own.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tests.agent.test_snapshots import add

from testkit.kube import FakeKube
from virtfleet.agent import agent as agent_module
from virtfleet.agent.agent import Agent
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.migration import MigrationAgent
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.snapshot import restores as restores_module
from virtfleet.agent.snapshot import snapshots as snapshots_module
from virtfleet.agent.snapshot.agent import SnapshotAgent
from virtfleet.hypervisor import Hypervisor
from virtfleet.identity import NODE_LABEL
from virtfleet.runtime.queue import Backoff, WorkQueue

NODE = "node-a"
KEY = ("ns", "vm")


def condition(body: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next(
        (c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == kind), None
    )


def vm_body(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "vm",
            "uid": "11111111-2222-4333-8444-555555555555",
            "generation": 1,
            "labels": {NODE_LABEL: NODE},
        },
        "status": {"nodeName": NODE},  # placed by the controller (reconcile.claim)
        "spec": {
            "memory": {"size": "64Mi"},
            "kernel": {"image": "guest-vmlinuz", "cmdline": "console=ttyS0"},
            **spec,
        },
    }


def make(hv: Hypervisor, **settings: Any) -> tuple[Agent, FakeKube]:
    kube = FakeKube()
    agent = Agent(AgentSettings(node_name=NODE, serial_log_dir="/serial", **settings), hv, kube)
    return agent, kube


async def run_until(
    queue: WorkQueue[Any],
    handler: Callable[[Any], Awaitable[float | None]],
    key: Any,
    done: Callable[[], bool],
) -> None:
    """Run ``queue`` (fast backoff) until ``done()``; fails after a few seconds."""
    queue.backoff = Backoff(base=0.05, cap=0.05)
    task = asyncio.create_task(queue.run(handler))
    queue.add(key)
    try:
        for _ in range(200):
            if done():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the loop never reported")
    finally:
        await queue.stop(grace=1)
        await task


def assert_internal_error(kube: FakeKube, kind: str, name: str, words: str) -> dict[str, Any]:
    body = kube.objects[(kind, "ns", name)]
    stalled, ready = condition(body, "Stalled"), condition(body, "Ready")
    assert stalled is not None
    assert ready is not None
    assert (stalled["status"], stalled["reason"]) == ("True", "InternalError")
    assert (ready["status"], ready["reason"]) == ("False", "InternalError")
    assert words in stalled["message"], stalled["message"]
    assert (name, "InternalError") in kube.events
    return body


def explode(*_: Any, **__: Any) -> Any:
    raise OverflowError("date value out of range")


async def test_vm_loop(hv: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, kube = make(hv)
    agent.on_vm_event("ADDED", kube.put("VirtualMachine", vm_body()))
    monkeypatch.setattr(agent_module, "decide", explode)

    def reported() -> bool:
        return ("vm", "InternalError") in kube.events and agent.queue.failures(KEY) >= 2

    await run_until(agent.queue, agent.reconcile, KEY, reported)
    assert_internal_error(kube, "VirtualMachine", "vm", "OverflowError: date value out of range")
    assert kube.events.count(("vm", "InternalError")) >= 2  # each retry says so (aggregated)

    monkeypatch.undo()
    await agent.reconcile(KEY)  # works again: the next pass clears the condition
    assert condition(kube.objects[("VirtualMachine", "ns", "vm")], "Stalled") is None


def secret(data: bytes, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "seed", "labels": labels},
        "data": {"userdata": base64.b64encode(data).decode()},
    }


CLOUD_INIT = {"cloudInit": {"userDataSecretRef": {"name": "seed"}}}


async def test_a_secret_that_is_not_utf8_is_a_stalled_reason(hv: Hypervisor) -> None:
    agent, kube = make(hv)
    kube.put("Secret", secret(b"#cloud-config\n\xff\xfe"))
    agent.on_vm_event("ADDED", kube.put("VirtualMachine", vm_body(**CLOUD_INIT)))
    await agent.reconcile(KEY)
    stalled = condition(kube.objects[("VirtualMachine", "ns", "vm")], "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "SecretNotUTF8"
    assert "not UTF-8 text (byte 14)" in stalled["message"]
    assert ("vm", "SecretNotUTF8") in kube.events


async def test_a_secret_the_agent_may_not_read_is_a_stalled_reason(
    hv: Hypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtfleet.runtime.kube import Forbidden

    agent, kube = make(hv)
    get = kube.get

    async def forbidden(kind: str, namespace: str, name: str) -> dict[str, Any]:
        if kind == "Secret":
            raise Forbidden("secrets is forbidden", status=403)
        return await get(kind, namespace, name)

    agent.on_vm_event("ADDED", kube.put("VirtualMachine", vm_body(**CLOUD_INIT)))
    monkeypatch.setattr(kube, "get", forbidden)
    await agent.reconcile(KEY)
    stalled = condition(kube.objects[("VirtualMachine", "ns", "vm")], "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "SecretForbidden"


async def test_a_required_secret_label_is_enforced(hv: Hypervisor) -> None:
    agent, kube = make(hv, cloud_init_secret_label="virtfleet.io/cloud-init=true")
    kube.put("Secret", secret(b"#cloud-config\n"))
    body = kube.put("VirtualMachine", vm_body(**CLOUD_INIT))
    agent.on_vm_event("ADDED", body)
    await agent.reconcile(KEY)
    stalled = condition(kube.objects[("VirtualMachine", "ns", "vm")], "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "SecretNotLabelled"
    assert "virtfleet.io/cloud-init=true" in stalled["message"]

    kube.put("Secret", secret(b"#cloud-config\n", **{"virtfleet.io/cloud-init": "true"}))
    assert await agent._user_data(await agent._view(body)) == "#cloud-config\n"


async def test_snapshot_and_restore_loops(hv: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, kube = make(hv)
    agent.on_vm_event("ADDED", kube.put("VirtualMachine", vm_body()))
    snaps = SnapshotAgent(agent, VmLocks())
    add(kube, snaps, "VMSnapshot", "s1", {"vmName": "vm"})
    add(kube, snaps, "VMRestore", "r1", {"vmName": "vm", "snapshotName": "s1"})
    monkeypatch.setattr(snapshots_module, "decide_snapshot", explode)
    monkeypatch.setattr(restores_module, "decide_restore", explode)

    await run_until(
        snaps.snapshot_queue,
        snaps.reconcile_snapshot,
        ("ns", "s1"),
        lambda: ("s1", "InternalError") in kube.events,
    )
    assert_internal_error(kube, "VMSnapshot", "s1", "OverflowError")
    await run_until(
        snaps.restore_queue,
        snaps.reconcile_restores,
        KEY,  # restores are queued by their VM
        lambda: ("r1", "InternalError") in kube.events,
    )
    assert_internal_error(kube, "VMRestore", "r1", "OverflowError")


async def test_migration_loop(hv: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, kube = make(hv)
    locks = VmLocks()
    migrations = MigrationAgent(agent, locks, SnapshotAgent(agent, locks))
    body = kube.put(
        "VMMigration",
        {
            "metadata": {"namespace": "ns", "name": "m1", "uid": "m-1", "generation": 1},
            "spec": {"vmName": "vm"},
            "status": {"phase": "Scheduled", "sourceNode": NODE, "targetNode": "node-b"},
        },
    )
    migrations.on_event("ADDED", body)
    monkeypatch.setattr(migrations, "_start", explode)
    await run_until(
        migrations.queue,
        migrations.reconcile,
        ("ns", "m1"),
        lambda: ("m1", "InternalError") in kube.events,
    )
    stored = assert_internal_error(kube, "VMMigration", "m1", "OverflowError")
    assert stored["status"]["phase"] == "Scheduled"  # the error says nothing about the phase
