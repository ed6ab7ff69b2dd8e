"""Drain: a VM on a cordoned Node is live-migrated away, or told why it stays.

A running VM with ``evictionStrategy: LiveMigrate`` gets a VMMigration
``<vm>-evict-<node>`` (labelled ``virtfleet.io/eviction=<node>``; the deterministic name
makes a restart find it rather than create another); every other VM stays where it is
and a Warning Event on the VM (and on the Node) says so, once per VM and node.
"""

from __future__ import annotations

from typing import Any

from virtfleet.controller.cache import FleetCache
from virtfleet.controller.migrations import MigrationScheduler
from virtfleet.identity import Key
from virtfleet.reconcile.migration import (
    EVICTION_LABEL,
    EvictionCandidate,
    eviction_name,
    plan_eviction,
)
from virtfleet.runtime.kube import Conflict, KubeApi, KubeError

COMPONENT = "virtfleet-controller"


class Drainer:
    """The drain step of the controller's VM reconcile (see the module doc)."""

    def __init__(self, cache: FleetCache, kube: KubeApi, migrations: MigrationScheduler) -> None:
        self.cache = cache
        self.kube = kube
        self.migrations = migrations
        #: (VM key, node) pairs whose drain outcome was already said (one Event each).
        self.noted: set[tuple[Key, str]] = set()

    def forget_node(self, node: str) -> None:
        """The node was uncordoned (or is gone): a later cordon is said again."""
        self.noted = {n for n in self.noted if n[1] != node}

    async def drain(self, key: Key, node: str, log: Any) -> None:
        """The VM's node is cordoned: migrate it live, or say that it stays."""
        vm = self.cache.vms.get(key)
        if vm is None:
            return
        plan = plan_eviction(
            [
                EvictionCandidate(
                    vm.name,
                    vm.eviction_strategy,
                    vm.status.get("printableStatus"),
                    deleting=vm.deleting,
                )
            ]
        )
        noted = (key, node)
        if plan.report and noted not in self.noted:
            self.noted.add(noted)
            message = (
                f"node {node} is cordoned but evictionStrategy is None: the VM stays on "
                f"{node} (set evictionStrategy: LiveMigrate, or stop or migrate it by hand)"
            )
            log.warning("drain: VM not migratable", message=message)
            await self.kube.record_event(vm.body, "Warning", "EvictionBlocked", message, COMPONENT)
            node_ref = {"apiVersion": "v1", "kind": "Node", "name": node}
            await self.kube.record_event(
                node_ref,
                "Warning",
                "EvictionBlocked",
                f"VirtualMachine {vm.namespace}/{vm.name} stays on cordoned node {node} "
                "(evictionStrategy None)",
                COMPONENT,
            )
        if not plan.migrate:
            return
        name = eviction_name(vm.name, node)
        if (vm.namespace, name) in self.migrations.cache:
            return
        body = {
            "metadata": {
                "name": name,
                "namespace": vm.namespace,
                "labels": {EVICTION_LABEL: node},
            },
            "spec": {"vmName": vm.name, "mode": "Live"},
        }
        try:
            created = await self.kube.create("VMMigration", body)
        except Conflict:
            return  # made before (by us, before a restart): the name is the record
        except KubeError as exc:
            log.warning("drain: cannot create the VMMigration", error=str(exc))
            return
        self.migrations.event("ADDED", created)
        log.info("drain: migrating the VM away", vmmigration=name)
        if noted not in self.noted:
            self.noted.add(noted)
            await self.kube.record_event(
                vm.body,
                "Normal",
                "Evicting",
                f"node {node} is cordoned: live migration {name} created",
                COMPONENT,
            )
