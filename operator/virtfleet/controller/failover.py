"""Moving a VM off a fenced node (decisions: :mod:`virtfleet.reconcile.failover`).

Under the node's lock (:meth:`NodeKeeper.lock`: no move once the controller decided the
node's agent is back), under the placement lock (a failover is a placement), the VM's
status is written first with a compare-and-swap (``nodeName``, ``failover``, the
``FailedOver`` condition), then its label and finalizers in one write: the failed node's
agent finalizer goes (that agent cannot clean up; its node's stale copy is its own
business when it returns), the new node's comes. A crash between the two writes is
repaired by the controller's label repair, which drops the old finalizer too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from virtfleet.api.conditions import rfc3339
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.controller.backup_common import BACKUP
from virtfleet.controller.cache import FleetCache
from virtfleet.controller.nodes import NodeKeeper
from virtfleet.controller.settings import ControllerSettings
from virtfleet.identity import Key, node_finalizer
from virtfleet.reconcile import failover as rules
from virtfleet.reconcile.placement import Placement, place
from virtfleet.runtime.kube import Conflict, KubeApi, NotFound
from virtfleet.runtime.status import status_patch

COMPONENT = "virtfleet-controller"
#: VMMigration phases during which a copy of the VM may sit on the target too. A
#: Scheduled one has made nothing yet (its source agent sets Running, compare-and-swap,
#: before it touches the target), and a fenced source never will.
UNFINISHED_MIGRATION = frozenset({"Running"})
#: A VM that waits for a node to fit is looked at again this often (in-memory checks).
WAIT_RETRY = 5.0


class Failover:
    def __init__(
        self,
        cache: FleetCache,
        kube: KubeApi,
        settings: ControllerSettings,
        nodes: NodeKeeper,
        backups: Mapping[tuple[str, str, str], Mapping[str, Any]],
        migrations: Mapping[Key, Mapping[str, Any]],
        placing: asyncio.Lock,
        clock: Callable[[], datetime],
    ) -> None:
        self.cache = cache
        self.kube = kube
        self.settings = settings
        self.nodes = nodes
        self.backups = backups
        self.migrations = migrations
        self.placing = placing
        self.clock = clock
        #: The last reason each VM was told it does not fail over (one Event per reason).
        self._said: dict[Key, str] = {}

    def forget(self, key: Key) -> None:
        self._said.pop(key, None)

    def _migrating(self, namespace: str, name: str) -> bool:
        for (ns, _), body in self.migrations.items():
            if ns != namespace or (body.get("spec") or {}).get("vmName") != name:
                continue
            if (body.get("status") or {}).get("phase") in UNFINISHED_MIGRATION:
                return True
        return False

    async def handle(self, key: Key, log: Any) -> tuple[bool, float | None]:
        """Fail the VM over if its node is fenced: (moved, when to look again)."""
        vm = self.cache.vms.get(key)
        if vm is None or vm.node_name is None or vm.deleting:
            return False, None
        old_node = vm.node_name
        if self.nodes.fence_mark(old_node) is None:
            return False, None  # the common case, without taking any lock
        async with self.nodes.lock(old_node), self.placing:
            mark = self.nodes.fence_mark(old_node)
            vm = self.cache.vms.get(key)
            if mark is None or vm is None or vm.node_name != old_node or vm.deleting:
                return False, None
            try:
                spec: VirtualMachineSpec | None = VirtualMachineSpec.model_validate(
                    vm.body.get("spec") or {}
                )
            except ValidationError:
                spec = None
            shared = set().union(*(h.shared_pools for h in self.cache.hosts.values()))
            backups = rules.latest_backups(
                vm.uid,
                (b for k, b in self.backups.items() if k[0] == BACKUP and k[1] == vm.namespace),
            )
            known = vm.status.get("highAvailability")
            plan = rules.plan_failover(
                spec,
                shared,
                None,
                backups,
                spec_seen_by_node=spec is not None and known == spec.high_availability.value,
                migrating=self._migrating(vm.namespace, vm.name),
            )
            if isinstance(plan, rules.Stay):
                await self._say(vm.body, key, plan.reason, plan.message, log)
                return False, None if plan.stalled else WAIT_RETRY  # stays Unknown meanwhile
            now = self.clock()
            assert vm.request is not None  # a readable spec
            outcome = place(  # the fenced node is not fresh: never a candidate
                vm.request,
                self.cache.allocated(),
                self.cache.hosts,
                self.cache.nodes,
                now=now,
                heartbeat_timeout=self.settings.heartbeat_timeout,
                overcommit=self.settings.overcommit,
            )
            if not isinstance(outcome, Placement):
                message = f"fails over once a node fits: {outcome.message}"
                await self._say(vm.body, key, "FailoverWaiting", message, log)
                return False, WAIT_RETRY
            status = rules.failover_status(
                vm.status,
                vm.generation,
                plan,
                from_node=old_node,
                to_node=outcome.node,
                reason=mark.reason,
                now=now,
                timestamp=rfc3339(now),
            )
            try:
                body = await self.kube.patch_status(
                    "VirtualMachine",
                    vm.namespace,
                    vm.name,
                    status_patch(vm.status, status) or {},
                    resource_version=vm.resource_version,
                )
            except Conflict:
                return True, 1.0
            except NotFound:
                return True, None
            moved = self.cache.upsert_vm(body)
            await self.move_metadata(moved or vm, outcome.node, log)
        message = rules.failover_message(status)
        log.warning("failed over", to=outcome.node, why=mark.reason)
        await self.kube.record_event(body, "Warning", rules.FAILED_OVER, message, COMPONENT)
        self._said.pop(key, None)
        return True, None

    async def release_deleted(self, key: Key, log: Any) -> None:
        """A VM deleted while its node is fenced: drop that node's agent finalizer, so the
        deletion does not wait for a node that may never return (KubeVirt's VMIs stay
        Terminating there). The node's agent finds the domain's VM gone when it returns,
        and its sweep removes the domain and volumes."""
        vm = self.cache.vms.get(key)
        if vm is None or not vm.deleting or vm.node_name is None:
            return
        if self.nodes.fence_mark(vm.node_name) is None:
            return
        finalizer = node_finalizer(vm.node_name)
        finalizers = list(vm.body.get("metadata", {}).get("finalizers") or [])
        if finalizer not in finalizers:
            return
        patch = {
            "metadata": {
                "finalizers": [f for f in finalizers if f != finalizer],
                "resourceVersion": vm.resource_version,
            }
        }
        try:
            body = await self.kube.patch("VirtualMachine", vm.namespace, vm.name, patch)
        except (Conflict, NotFound):
            return  # the next event brings it back
        self.cache.upsert_vm(body)
        message = (
            f"node {vm.node_name} is fenced: its agent's finalizer is released so the "
            "deletion completes; the node removes its leftovers when it returns"
        )
        log.warning("finalizer of a fenced node released", node=vm.node_name)
        await self.kube.record_event(body, "Normal", "FinalizerReleased", message, COMPONENT)

    async def move_metadata(self, vm: Any, node: str, log: Any) -> bool:
        """Label → ``node``; the failed node's finalizer out, ``node``'s in. False on a
        conflict (the label repair does it again on the next pass)."""
        finalizers = list(vm.body.get("metadata", {}).get("finalizers") or [])
        failover = vm.status.get("failover") or {}
        old = failover.get("fromNode")
        wanted = [f for f in finalizers if not old or f != node_finalizer(str(old))]
        if node_finalizer(node) not in wanted:
            wanted.append(node_finalizer(node))
        metadata: dict[str, Any] = {"labels": {"virtfleet.io/node": node}}
        if wanted != finalizers:
            metadata["finalizers"] = wanted
            metadata["resourceVersion"] = vm.resource_version
        try:
            body = await self.kube.patch(
                "VirtualMachine", vm.namespace, vm.name, {"metadata": metadata}
            )
        except NotFound:
            return True
        except Conflict:
            return False
        self.cache.upsert_vm(body)
        log.info("moved to the failover node", node=node, finalizers=wanted)
        return True

    async def _say(
        self, body: Mapping[str, Any], key: Key, reason: str, message: str, log: Any
    ) -> None:
        if self._said.get(key) == reason:
            return
        self._said[key] = reason
        log.warning("no failover", reason=reason, message=message)
        await self.kube.record_event(body, "Warning", reason, message, COMPONENT)
