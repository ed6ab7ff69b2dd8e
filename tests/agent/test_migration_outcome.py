"""A live migration whose outcome cannot be seen is recovered, never called failed.

Found by the chaos run: libvirtd on the source was SIGKILLed the moment the job
finished. Looking where the domain runs then raised "not connected", the job was
reported failed and the VM released — and the VM loop started a second copy of a guest
that was already running on the target.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from virtfleet.agent.migration import MigrationAgent
from virtfleet.agent.migration import handoff as handoff_module
from virtfleet.agent.migration import live as live_module
from virtfleet.agent.migration import target as target_module
from virtfleet.agent.migration.jobs import RunningJob
from virtfleet.agent.migration.target import PreparedTarget
from virtfleet.api.migration import VMMigrationSpec
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.hypervisor import Hypervisor
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.logs import get_logger
from virtfleet.reconcile.migration_job import DomainWhere, Fail

KEY = ("ns", "m1")
VM_BODY = {"metadata": {"name": "vm1", "namespace": "ns", "uid": "u-1"}}


class FakeTarget:
    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FakeGuest:
    async def xml(self) -> str:
        return "<domain><devices/></domain>"


def make(monkeypatch: pytest.MonkeyPatch, where: Any) -> tuple[MigrationAgent, list[str]]:
    agent = SimpleNamespace(
        kube=None, hv=None, settings=SimpleNamespace(node_name="node-a"), metrics=None
    )
    migrations = MigrationAgent(agent, None, None)  # type: ignore[arg-type]
    monkeypatch.setattr(migrations.ctx, "target", FakeTarget)
    said: list[str] = []

    async def prepare(*_: Any) -> PreparedTarget:
        return PreparedTarget()

    async def migrate(*_: Any, **__: Any) -> str | None:
        return "connection lost"

    async def where_now(*_: Any) -> DomainWhere:
        if isinstance(where, Exception):
            raise where
        return where  # type: ignore[no-any-return]

    async def fail(key: Any, vm_key: Any, end: Fail) -> None:
        said.append(f"finish {end.reason}")
        if end.release_vm:
            said.append("released")

    async def handoff(*_: Any, **__: Any) -> None:
        said.append("handoff")

    monkeypatch.setattr(target_module, "prepare_target", prepare)
    monkeypatch.setattr(live_module, "migrate", migrate)
    monkeypatch.setattr(handoff_module, "where", where_now)
    monkeypatch.setattr(migrations.ctx, "fail", fail)
    monkeypatch.setattr(handoff_module, "handoff", handoff)
    return migrations, said


async def run(migrations: MigrationAgent) -> None:
    spec = VMMigrationSpec.model_validate({"vmName": "vm1"})
    vm_spec = VirtualMachineSpec.model_validate({"memory": {"size": "64Mi"}})
    log = SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None)
    job = RunningJob(guest=FakeGuest())  # type: ignore[arg-type]
    await live_module.run_live(
        migrations.ctx,
        job,
        KEY,
        spec,
        VM_BODY,
        vm_spec,
        "qemu+tcp://b/system",
        log,
    )


@pytest.mark.parametrize(
    "where",
    [
        hv_errors.ConnectionLost("not connected to qemu+tcp://a/system"),
        DomainWhere(False, False, False, False),  # neither runs it (yet)
        DomainWhere(True, True, True, True),  # both do: never pick one blindly
    ],
    ids=["source-libvirtd-gone", "neither", "both"],
)
async def test_an_unknown_outcome_is_left_to_the_recovery(
    monkeypatch: pytest.MonkeyPatch, where: Any
) -> None:
    migrations, said = make(monkeypatch, where)
    await run(migrations)
    assert said == []  # neither failed nor released: the VM loop keeps waiting
    assert KEY in migrations.queue._dirty  # the recovery looks again


async def test_a_clear_outcome_is_acted_on(monkeypatch: pytest.MonkeyPatch) -> None:
    migrations, said = make(monkeypatch, DomainWhere(True, True, False, False))
    await run(migrations)
    assert said == ["finish MigrationFailed", "released"]
    migrations, said = make(monkeypatch, DomainWhere(False, False, True, True))
    await run(migrations)
    assert said == ["handoff"]


@pytest.mark.parametrize("left", ["paused", "defined"])
async def test_the_hand_over_removes_what_the_source_libvirtd_left(
    hv: Hypervisor, domain_xml: Callable[..., str], left: str
) -> None:
    """A source libvirtd killed before it confirmed the job leaves a paused or stopped copy."""
    uid = "00000000-0000-4000-8000-000000000001"
    guest = await hv.define(domain_xml("ns_vm1", uid, namespace="ns", vm_name="vm1"))
    if left == "paused":
        await guest.start()
        await guest.suspend()
    agent = SimpleNamespace(
        kube=None, hv=hv, settings=SimpleNamespace(node_name="node-a"), metrics=None
    )
    migrations = MigrationAgent(agent, None, None)  # type: ignore[arg-type]
    await handoff_module.remove_source_leftover(migrations.ctx, uid, get_logger("test"))
    assert await hv.lookup(uid) is None
    # Nothing left: a no-op.
    await handoff_module.remove_source_leftover(migrations.ctx, uid, get_logger("test"))
