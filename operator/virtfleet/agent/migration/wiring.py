"""kopf wiring of the migration loop: the watch, the deletion handler, the tasks."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import kopf

from virtfleet.agent.agent import Agent, key_of
from virtfleet.agent.migration.loop import MigrationAgent
from virtfleet.agent.settings import DELETE_WAIT_SECONDS, AgentSettings
from virtfleet.identity import API_GROUP, API_VERSION, NODE_LABEL

#: The deletion handler asks kopf to call it again this soon while a job still runs.
CANCEL_RETRY_SECONDS = 1

if TYPE_CHECKING:
    from virtfleet.agent.locks import VmLocks
    from virtfleet.agent.snapshot.agent import SnapshotAgent


def register(
    registry: kopf.OperatorRegistry,
    settings: AgentSettings,
    get: Callable[[], MigrationAgent],
) -> None:
    """Watch every VMMigration; hold this node's finalizer on those it adopted (cancel)."""
    on_node = {NODE_LABEL: settings.node_name}

    @kopf.on.event(API_GROUP, API_VERSION, "vmmigrations", registry=registry)  # type: ignore[arg-type]
    def vmmigration_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.delete(API_GROUP, API_VERSION, "vmmigrations", labels=on_node, registry=registry)
    async def vmmigration_delete(body: Any, **_: Any) -> None:
        if not await get().cancel(key_of(body), DELETE_WAIT_SECONDS):
            raise kopf.TemporaryError("cancelling the migration", delay=CANCEL_RETRY_SECONDS)


def start(
    agent: Agent, locks: VmLocks, snaps: SnapshotAgent
) -> tuple[MigrationAgent, list[asyncio.Task[None]]]:
    migrations = MigrationAgent(agent, locks, snaps)
    tasks = [
        asyncio.create_task(migrations.queue.run(migrations.reconcile), name="vmmigration-queue"),
        asyncio.create_task(_resync(migrations), name="vmmigration-resync"),
    ]
    return migrations, tasks


async def _resync(migrations: MigrationAgent) -> None:
    while True:
        await asyncio.sleep(migrations.settings.resync_seconds)
        migrations.resync()
