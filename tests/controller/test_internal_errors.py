"""No controller loop leaves an object silent: an unexpected error is a condition and an Event.

As tests/agent/test_internal_errors.py for the agent: each queue runs its real reconcile
with one pure decision made to raise; the object must say Stalled/Ready=False
(``InternalError``) with a Warning Event, and the key is retried with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tests.controller.test_controller import add_vm, make

from testkit.kube import FakeKube
from virtfleet.controller import controller as controller_module
from virtfleet.controller import migrations as migrations_module
from virtfleet.controller import unclaimed as unclaimed_module
from virtfleet.runtime.queue import Backoff, WorkQueue


def explode(*_: Any, **__: Any) -> Any:
    raise OverflowError("date value out of range")


async def run_until(
    queue: WorkQueue[Any],
    handler: Callable[[Any], Awaitable[float | None]],
    key: Any,
    kube: FakeKube,
    name: str,
) -> dict[str, Any]:
    """Run ``queue`` until ``name`` has an InternalError Event; returns its conditions."""
    queue.backoff = Backoff(base=0.05, cap=0.05)
    task = asyncio.create_task(queue.run(handler))
    queue.add(key)
    try:
        for _ in range(200):
            if (name, "Warning", "InternalError") in kube.events and queue.failures(key) >= 2:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the loop never reported")
    finally:
        await queue.stop(grace=1)
        await task
    conditions = kube.objects[("ns", name)]["status"]["conditions"]
    by_type = {c["type"]: c for c in conditions}
    assert (by_type["Stalled"]["status"], by_type["Stalled"]["reason"]) == ("True", "InternalError")
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("False", "InternalError")
    assert "OverflowError: date value out of range" in by_type["Stalled"]["message"]
    return by_type


async def test_vm_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    controller, kube = make()
    add_vm(controller, kube, name="a")
    monkeypatch.setattr(controller_module, "place", explode)
    await run_until(controller.queue, controller.reconcile, ("ns", "a"), kube, "a")
    assert "nodeName" not in kube.objects[("ns", "a")]["status"]


def one_shot(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "50",
            "creationTimestamp": "2026-01-01T11:59:00Z",
        },
        "spec": spec,
        "status": {},
    }


async def test_migration_scheduling_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    controller, kube = make()
    add_vm(controller, kube, name="a")
    body = kube.put("VMMigration", one_shot("m1", {"vmName": "a"}))
    controller.migrations.event("ADDED", body)
    monkeypatch.setattr(migrations_module, "decide_schedule", explode)
    scheduler = controller.migrations
    await run_until(scheduler.queue, scheduler.reconcile, ("ns", "m1"), kube, "m1")


async def test_unclaimed_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    controller, kube = make()
    body = kube.put("VMSnapshot", one_shot("s1", {"vmName": "missing"}))
    controller.unclaimed.event("VMSnapshot", "ADDED", body)
    monkeypatch.setattr(unclaimed_module, "unclaimed_snapshot_status", explode)
    unclaimed = controller.unclaimed
    await run_until(unclaimed.queue, unclaimed.reconcile, ("VMSnapshot", "ns", "s1"), kube, "s1")


@pytest.mark.parametrize("spec", [{"memory": "x"}, {"memory": ["1Gi"]}])
def test_a_vm_of_the_wrong_shape_is_cached_as_unschedulable(spec: Any) -> None:
    """The watch handler must not crash (the VM would be left out of the cache, silent)."""
    controller, _ = make()
    body = {"metadata": {"namespace": "ns", "name": "odd", "resourceVersion": "1"}, "spec": spec}
    controller.vm_event("ADDED", body)
    view = controller.cache.vms[("ns", "odd")]
    assert view.request is None
    assert view.spec_error == "spec.memory must be an object"
