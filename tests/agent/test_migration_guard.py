"""The VM loop's guard: after a restart mid-migration, the VM waits for the recovery."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

from testkit.kube import Body, FakeKube
from virtfleet.agent.migration import MigrationAgent
from virtfleet.agent.migration.loop import RECOVERY_WAIT_SECONDS
from virtfleet.runtime.kubeapi import KindLike

NODE = "node-a"


class ListingKube(FakeKube):
    """The shared fake, counting the lists the guard asks for (reads are not in ``calls``)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__()
        for item in items:
            self.put("VMMigration", item)
        self.lists = 0

    async def list(
        self,
        kind: KindLike,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Body]:
        self.lists += 1
        return await super().list(kind, namespace, label_selector, field_selector)


def migration(phase: str, source: str = NODE, vm: str = "vm1") -> dict[str, Any]:
    return {
        "metadata": {"name": "m1", "namespace": "ns", "resourceVersion": "5"},
        "spec": {"vmName": vm},
        "status": {"phase": phase, "sourceNode": source},
    }


def make(
    printable: str = "Running", listed: list[dict[str, Any]] | None = None
) -> tuple[MigrationAgent, ListingKube, list[Any]]:
    kube = ListingKube(listed or [])
    vm = {"metadata": {"name": "vm1", "namespace": "ns"}, "status": {"printableStatus": printable}}
    agent = SimpleNamespace(
        kube=kube, hv=None, settings=SimpleNamespace(node_name=NODE), cache={("ns", "vm1"): vm}
    )
    migrations = MigrationAgent(agent, None, None)  # type: ignore[arg-type]
    return migrations, kube, []


async def test_a_running_migration_without_a_job_here_holds_the_vm_loop() -> None:
    migrations, _, calls = make("Migrating")
    migrations.cache[("ns", "m1")] = migration("Running")
    guarded = migrations.guard(lambda key: _record(calls, key))
    assert await guarded(("ns", "vm1")) == RECOVERY_WAIT_SECONDS
    assert calls == []
    assert ("ns", "m1") in migrations.queue._dirty


async def test_at_start_up_the_api_is_asked_when_the_cache_knows_no_migration() -> None:
    migrations, kube, calls = make("Migrating", [migration("Running")])
    guarded = migrations.guard(lambda key: _record(calls, key))
    assert await guarded(("ns", "vm1")) == RECOVERY_WAIT_SECONDS
    assert kube.lists == 1


async def test_finished_or_foreign_migrations_do_not_hold_it() -> None:
    for body in (migration("Failed"), migration("Running", source="node-b")):
        migrations, _, calls = make("Migrating", [body])
        migrations.cache[("ns", "m1")] = body
        guarded = migrations.guard(partial(_record, calls))
        assert await guarded(("ns", "vm1")) is None
        assert calls == [("ns", "vm1")]


async def test_a_running_vm_is_not_looked_up() -> None:
    migrations, kube, calls = make("Running")
    guarded = migrations.guard(lambda key: _record(calls, key))
    assert await guarded(("ns", "vm1")) is None
    assert kube.lists == 0


async def _record(calls: list[Any], key: Any) -> float | None:
    calls.append(key)
    return None
