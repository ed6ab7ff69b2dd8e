"""What every part of a migration job shares: clients, the VMMigration cache, and writes.

The loop (:mod:`.loop`), the live and offline jobs, the hand-over and the recovery all
write the same few things — the VMMigration's status (optionally compare-and-swap), the
VM's ``printableStatus``, and "let the VM loop look again" — so they go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from virtfleet.agent.agent import Agent
from virtfleet.api.migration import VMMigrationStatus
from virtfleet.api.virtualmachine import PrintableStatus
from virtfleet.hypervisor import Hypervisor, HypervisorSettings
from virtfleet.identity import Key
from virtfleet.logs import get_logger
from virtfleet.reconcile.migration import failed_status
from virtfleet.reconcile.migration_job import Fail
from virtfleet.reconcile.views import slim
from virtfleet.runtime.kube import Conflict, KubeError, NotFound
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest


def now() -> datetime:
    return datetime.now(UTC)


class MigrationContext:
    """Clients and the VMMigration cache of this node's migration loop."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.kube = agent.kube
        self.hv = agent.hv
        self.settings = agent.settings
        self.node = agent.settings.node_name
        self.cache: dict[Key, dict[str, Any]] = {}
        self.log = get_logger("virtfleet.agent.migrations", node=self.node)
        #: Queue the VMMigration again (the loop's queue; set by the loop).
        self.requeue: Callable[[Key], None] = lambda key: None

    def target(self, uri: str) -> Hypervisor:
        """A connection to the target's libvirtd (opened and closed by the job)."""
        return Hypervisor(HypervisorSettings(uri=uri, reboot_events=False, job_events=False))

    async def close_target(self, target: Hypervisor) -> None:
        try:
            await target.close()
        except Exception as exc:  # closing must never hide the job's own outcome
            self.log.warning("cannot close the target connection", error=str(exc))

    def status_of(self, key: Key) -> VMMigrationStatus:
        body = self.cache.get(key) or {}
        return VMMigrationStatus.model_validate(body.get("status") or {})

    def generation_of(self, key: Key) -> int:
        return int((self.cache.get(key) or {}).get("metadata", {}).get("generation", 1))

    async def write_status(self, key: Key, status: VMMigrationStatus, *, cas: bool = False) -> bool:
        """Patch what changed; with ``cas`` only if nobody wrote since the cached version."""
        body = self.cache.get(key)
        if body is None:
            return False
        patch = status_patch(body.get("status"), status.to_wire())
        if patch is None:
            return True
        version = str(body["metadata"].get("resourceVersion")) if cas else None
        try:
            updated = await self.kube.patch_status(
                "VMMigration", *key, patch, resource_version=version
            )
        except Conflict:
            await self._refresh(key)
            return False
        except NotFound:
            return False
        store_newest(self.cache, key, updated, cached_only=True)
        return True

    async def _refresh(self, key: Key) -> None:
        try:
            store_newest(
                self.cache, key, await self.kube.get("VMMigration", *key), cached_only=True
            )
        except KubeError as exc:
            self.log.info("cannot re-read the VMMigration after a conflict", error=str(exc))

    async def fail(self, key: Key, vm_key: Key, end: Fail) -> None:
        """Write the job's end for good (``Failed`` or ``Cancelled``) and act on the VM."""
        if key in self.cache:
            wanted = failed_status(
                self.status_of(key),
                self.generation_of(key),
                str(end.reason),
                end.message,
                now(),
                phase=end.phase,
            )
            await self.write_status(key, wanted)
        if end.vm_printable is not None:
            await self.vm_printable(vm_key, end.vm_printable)
        if end.release_vm:
            self.vm_released(vm_key)

    async def vm_printable(self, vm_key: Key, printable: PrintableStatus) -> None:
        """``Migrating`` while the job runs (the VM loop is locked out meanwhile)."""
        try:
            updated = await self.kube.patch_status(
                "VirtualMachine", *vm_key, {"printableStatus": printable.value}
            )
        except KubeError as exc:
            self.log.info("cannot write the VM's printableStatus", vm=vm_key[1], error=str(exc))
            return
        store_newest(self.agent.cache, vm_key, updated, shape=slim, cached_only=True)

    def vm_released(self, vm_key: Key) -> None:
        """The VM stays here: let its loop look again (and report Running)."""
        self.agent.queue.add(vm_key)

    def mine(self, body: Mapping[str, Any] | None) -> bool:
        return body is not None and self.agent.is_mine(body)
