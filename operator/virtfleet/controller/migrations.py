"""The controller's part of a VMMigration: validate it and pick (or check) the target.

Thin: the watch keeps a cache of VMMigrations; one reconcile per migration reads the
controller's fleet cache, asks :func:`virtfleet.reconcile.migration.decide_schedule`,
and writes ``Scheduled`` (source, target) or ``Failed`` with a reason — with a
resourceVersion precondition, so two deciders (or a decider and the agent) never both
write. Only unscheduled migrations are looked at: from ``Scheduled`` on, the source
node's agent owns the object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from virtfleet.api.migration import MigrationPhase, VMMigrationSpec, VMMigrationStatus
from virtfleet.api.resources import VM_MIGRATION
from virtfleet.controller.cache import FleetCache
from virtfleet.controller.settings import ControllerSettings
from virtfleet.identity import Key
from virtfleet.logs import get_logger
from virtfleet.reconcile.migration import (
    SLOT_PHASES,
    MigrationRef,
    Refused,
    Scheduled,
    VmFacts,
    competing,
    decide_schedule,
    failed_status,
    scheduled_status,
    slot_wait,
    waiting_status,
)
from virtfleet.reconcile.views import parse_time
from virtfleet.runtime.kube import Conflict, KubeApi, NotFound
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest


def _phase(body: Mapping[str, Any]) -> MigrationPhase | None:
    raw = (body.get("status") or {}).get("phase")
    try:
        return MigrationPhase(raw) if raw else None
    except ValueError:
        return None


def _ref(body: Mapping[str, Any]) -> MigrationRef:
    meta = body.get("metadata") or {}
    created = parse_time(meta.get("creationTimestamp")) or datetime.now(UTC)
    return MigrationRef(name=str(meta.get("name")), created=created, phase=_phase(body))


class MigrationScheduler:
    """VMMigration scheduling inside one controller.

    It is given the controller's fleet cache, API client, settings and clock rather than
    the controller itself, so that this module does not depend on the one that owns it.
    """

    def __init__(
        self,
        fleet: FleetCache,
        kube: KubeApi,
        settings: ControllerSettings,
        clock: Callable[[], datetime],
    ) -> None:
        self.fleet = fleet
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.cache: dict[Key, dict[str, Any]] = {}
        self.queue: WorkQueue[Key] = WorkQueue(name="vmmigrations", workers=2)
        self.log = get_logger("virtfleet.controller.migrations")
        #: Decisions one at a time, so two never both take the last free slot.
        self._deciding = asyncio.Lock()

    #: A migration waiting for a slot looks again this often (ends also wake it at once).
    WAIT_RETRY = 5.0

    def active_sources(self, exclude: Key) -> dict[str, str]:
        """Migrations holding a slot (scheduled, preparing, running) → their source node."""
        out = {}
        for key, obj in self.cache.items():
            if key == exclude or _phase(obj) not in SLOT_PHASES:
                continue
            out[f"{key[0]}/{key[1]}"] = str((obj.get("status") or {}).get("sourceNode") or "")
        return out

    def event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key: Key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if event_type == "DELETED":
            self.cache.pop(key, None)
            self.queue.forget(key)
        else:
            store_newest(self.cache, key, body)
        # A migration that ends (or goes) may unblock another one of the same VM, or free
        # a slot that a waiting one (of any VM) needs.
        vm_name = (body.get("spec") or {}).get("vmName")
        ended = event_type == "DELETED" or _phase(body) not in SLOT_PHASES
        for other, obj in self.cache.items():
            same_vm = other[0] == key[0] and (obj.get("spec") or {}).get("vmName") == vm_name
            if (same_vm or ended) and _phase(obj) in (None, MigrationPhase.PENDING):
                self.queue.add(other)

    async def reconcile(self, key: Key) -> float | None:
        async with self._deciding:
            return await self._reconcile(key)

    async def _reconcile(self, key: Key) -> float | None:
        body = self.cache.get(key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        if _phase(body) not in (None, MigrationPhase.PENDING):
            return None  # scheduled (or over): the source agent's business from here on
        meta = body["metadata"]
        generation = int(meta.get("generation") or 1)
        status = VMMigrationStatus.model_validate(body.get("status") or {})
        log = self.log.bind(namespace=key[0], vmmigration=key[1])
        now = self.clock()
        try:
            spec = VMMigrationSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            outcome: Any = Refused("InvalidSpec", str(exc).splitlines()[0])
        else:
            vm = self.fleet.vms.get((key[0], spec.vm_name))
            facts = (
                None
                if vm is None
                else VmFacts(vm.name, vm.node_name, vm.request, deleting=vm.deleting)
            )
            others = [
                _ref(obj)
                for other, obj in self.cache.items()
                if other[0] == key[0] and (obj.get("spec") or {}).get("vmName") == spec.vm_name
            ]
            settings = self.settings
            allocated = self.fleet.allocated()
            outcome = decide_schedule(
                spec,
                facts,
                competing(_ref(body), others),
                allocated,
                self.fleet.hosts,
                self.fleet.nodes,
                now=now,
                heartbeat_timeout=settings.heartbeat_timeout,
                overcommit=settings.overcommit,
            )
        retry: float | None = None
        if isinstance(outcome, Scheduled):
            settings = self.settings
            wait = slot_wait(
                outcome.source,
                self.active_sources(key),
                per_node=settings.max_migrations_per_node,
                per_cluster=settings.max_migrations_cluster,
            )
            if wait is not None:
                outcome, retry = wait, self.WAIT_RETRY
        if retry is not None:
            wanted = waiting_status(status, generation, outcome, now)
            if status.phase is not MigrationPhase.PENDING:
                log.info("migration waits for a slot", message=outcome.message)
        elif isinstance(outcome, Refused):
            wanted = failed_status(status, generation, outcome.reason, outcome.message, now)
            log.info("migration refused", reason=outcome.reason, message=outcome.message)
        else:
            wanted = scheduled_status(status, generation, outcome, now)
            log.info("migration scheduled", source=outcome.source, target=outcome.target)
        patch = status_patch(body.get("status"), wanted.to_wire())
        if patch is None:
            return retry
        try:
            updated = await self.kube.patch_status(
                VM_MIGRATION.kind,
                key[0],
                key[1],
                patch,
                resource_version=str(meta.get("resourceVersion")),
            )
        except Conflict:
            return 1.0
        except NotFound:
            return None
        store_newest(self.cache, key, updated, cached_only=True)
        return retry
