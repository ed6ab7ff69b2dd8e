"""kopf wiring of the controller: a registry of its own with the watch handlers only."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from virtfleet.api.resources import (
    VIRTUAL_MACHINE,
    VM_BACKUP,
    VM_BACKUP_LOCATION,
    VM_BACKUP_SCHEDULE,
    VM_HOST,
    VM_MIGRATION,
    VM_NETWORK,
    VM_RESTORE,
    VM_SNAPSHOT,
)
from virtfleet.identity import API_GROUP, API_VERSION
from virtfleet.logs import LogFormat
from virtfleet.runtime import apisession
from virtfleet.runtime.kopfsettings import configure_kopf

IDENTITY = "controller"

#: One watch event handler: ``(event type, object)``.
OnEvent = Callable[[str | None, Mapping[str, Any]], None]


@dataclass(frozen=True)
class Handlers:
    """What the watches feed (the controller's intake) and what start-up waits for."""

    vm: OnEvent
    host: OnEvent
    node: OnEvent
    migration: OnEvent
    network: OnEvent
    #: ``(kind, event type, object)`` for VMSnapshots and VMRestores.
    unclaimed: Callable[[str, str | None, Mapping[str, Any]], None]
    #: ``(kind, event type, object)`` for VMBackupLocations, VMBackups and VMRestores.
    backups: Callable[[str, str | None, Mapping[str, Any]], None]
    wait_until_served: Callable[[], Awaitable[None]]


def registry(
    handlers: Handlers, *, log_format: LogFormat = "auto", log_level: str = "INFO"
) -> kopf.OperatorRegistry:
    """A fresh kopf registry with the controller's handlers (no global side effects)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def _login(**kwargs: Any) -> kopf.AiohttpSession | None:
        # A registry of our own has no default login handler: use the official client's
        # (KUBECONFIG or the in-cluster service account, as KubeApi does), on a session
        # whose connection pool is bounded (kopf's is not: runtime.apisession).
        return apisession.login(**kwargs)

    @kopf.on.startup(registry=registry)
    async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(
            settings,
            identity=IDENTITY,
            finalizer=None,
            watch_only=True,
            log_format=log_format,
            log_level=log_level,
        )
        # kopf logs every successful on.event call at INFO: one line per heartbeat.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        await handlers.wait_until_served()

    @kopf.on.event(API_GROUP, API_VERSION, VIRTUAL_MACHINE.plural, registry=registry)
    async def _vm(event: Mapping[str, Any], **_: Any) -> None:
        handlers.vm(event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_HOST.plural, registry=registry)
    async def _host(event: Mapping[str, Any], **_: Any) -> None:
        handlers.host(event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_MIGRATION.plural, registry=registry)
    async def _migration(event: Mapping[str, Any], **_: Any) -> None:
        handlers.migration(event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_NETWORK.plural, registry=registry)
    async def _network(event: Mapping[str, Any], **_: Any) -> None:
        handlers.network(event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_SNAPSHOT.plural, registry=registry)
    async def _snapshot(event: Mapping[str, Any], **_: Any) -> None:
        handlers.unclaimed(VM_SNAPSHOT.kind, event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_RESTORE.plural, registry=registry)
    async def _restore(event: Mapping[str, Any], **_: Any) -> None:
        handlers.unclaimed(VM_RESTORE.kind, event.get("type"), event["object"])
        handlers.backups(VM_RESTORE.kind, event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_BACKUP.plural, registry=registry)
    async def _backup(event: Mapping[str, Any], **_: Any) -> None:
        handlers.backups(VM_BACKUP.kind, event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_BACKUP_SCHEDULE.plural, registry=registry)
    async def _schedule(event: Mapping[str, Any], **_: Any) -> None:
        handlers.backups(VM_BACKUP_SCHEDULE.kind, event.get("type"), event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, VM_BACKUP_LOCATION.plural, registry=registry)
    async def _location(event: Mapping[str, Any], **_: Any) -> None:
        handlers.backups(VM_BACKUP_LOCATION.kind, event.get("type"), event["object"])

    @kopf.on.event("v1", "nodes", registry=registry)
    async def _node(event: Mapping[str, Any], **_: Any) -> None:
        handlers.node(event.get("type"), event["object"])

    return registry
