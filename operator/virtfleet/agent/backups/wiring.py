"""The backup loops' kopf handlers and tasks: what :mod:`virtfleet.agent.handlers` wires."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import kopf

from virtfleet.agent.agent import Agent
from virtfleet.agent.backups.loop import BackupAgent
from virtfleet.agent.locks import VmLocks
from virtfleet.identity import API_GROUP, API_VERSION


def register(registry: kopf.OperatorRegistry, get: Callable[[], BackupAgent]) -> None:
    @kopf.on.event(API_GROUP, API_VERSION, "vmbackups", registry=registry)  # type: ignore[arg-type]
    def vmbackup_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().on_event(event.get("type"), copy.deepcopy(obj))

    @kopf.on.event(API_GROUP, API_VERSION, "vmrestores", registry=registry)  # type: ignore[arg-type]
    def vmrestore_event(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if isinstance(obj, dict):
            get().restores.on_event(event.get("type"), copy.deepcopy(obj))


def start(agent: Agent, locks: VmLocks) -> tuple[BackupAgent, list[asyncio.Task[None]]]:
    backups = BackupAgent(agent, locks)
    agent.hv.on_event(backups.on_domain_event)
    tasks = [
        asyncio.create_task(backups.queue.run(backups.reconcile), name="vmbackup-queue"),
        asyncio.create_task(
            backups.restores.queue.run(backups.restores.reconcile), name="backup-restore-queue"
        ),
        asyncio.create_task(_resync(backups), name="backup-resync"),
    ]
    return backups, tasks


async def stop(backups: BackupAgent) -> None:
    await backups.queue.stop()
    await backups.restores.queue.stop()
    for restore in backups.restores.memos.values():
        restore.discard()
    for memo in backups.memos.values():
        if memo.upload is not None:
            memo.upload.cancel()


async def _resync(backups: BackupAgent) -> None:
    while True:
        await asyncio.sleep(backups.settings.resync_seconds)
        backups.resync()


__all__ = ["register", "start", "stop"]
