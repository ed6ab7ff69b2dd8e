"""The controller's in-memory view of the fleet, fed by kopf's watch events.

Handlers only update this cache and enqueue keys; decisions read it. The controller
also feeds it the objects its own writes return, so a placement is counted against a
node's memory immediately, before the watch echoes it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from virtfleet.controller.macs import MacIndex, explicit_macs
from virtfleet.identity import Key
from virtfleet.reconcile.node_health import LEASE_PREFIX, LeaseView
from virtfleet.reconcile.views import CachedVm, HostView, NodeView
from virtfleet.runtime.versions import is_older, older_version


class FleetCache:
    """VMs by (namespace, name), VMHosts and Nodes by name."""

    def __init__(self) -> None:
        self.vms: dict[Key, CachedVm] = {}
        self.hosts: dict[str, HostView] = {}
        self.nodes: dict[str, NodeView] = {}
        #: Agents' heartbeat Leases by node (reconcile.node_health).
        self.leases: dict[str, LeaseView] = {}
        #: Explicit MACs in use, so a placement checks uniqueness without a scan.
        self.macs = MacIndex()
        # Indexes kept with every VM change, so that a placement, a node's event or a
        # deletion costs O(1) or O(that node's VMs), never a scan of the fleet (issue #21).
        self._on_node: dict[str, set[Key]] = {}
        self._allocated: dict[str, int] = {}
        #: An ordered set: the unplaced are retried oldest first.
        self._unplaced: dict[Key, None] = {}

    def upsert_vm(self, body: Mapping[str, Any]) -> CachedVm | None:
        """Store a VM body; ``None`` (and no change) when it is older than what is cached."""
        view = CachedVm.from_body(body)
        current = self.vms.get(view.key)
        if current is not None and is_older(body, current.body):
            return None
        if current is not None:
            self._unindex(current)
        self.vms[view.key] = view
        self._index(view)
        self.macs.update(view.key, explicit_macs(body.get("spec") or {}))
        return view

    def remove_vm(self, key: Key) -> CachedVm | None:
        self.macs.remove(key)
        gone = self.vms.pop(key, None)
        if gone is not None:
            self._unindex(gone)
        return gone

    def reserve(self, vm: CachedVm, status: Mapping[str, Any]) -> CachedVm:
        """Count a placement whose status write is on its way: the next decision sees the
        node's memory taken without waiting for the apiserver (placements are decided one
        at a time, their writes run side by side). The write's answer, or a newer watch
        event, replaces this view; :meth:`release` takes it back if the write fails."""
        reserved = dataclasses.replace(vm, status=dict(status))
        current = self.vms.get(vm.key)
        if current is not None:
            self._unindex(current)
        self.vms[vm.key] = reserved
        self._index(reserved)
        return reserved

    def release(self, reserved: CachedVm, original: CachedVm) -> None:
        """Undo :meth:`reserve` unless something newer replaced the reserved view."""
        if self.vms.get(reserved.key) is reserved:
            self._unindex(reserved)
            self.vms[reserved.key] = original
            self._index(original)

    def _index(self, vm: CachedVm) -> None:
        node = vm.node_name
        if node is None:
            if not vm.deleting:
                self._unplaced[vm.key] = None
            return
        self._on_node.setdefault(node, set()).add(vm.key)
        self._allocated[node] = self._allocated.get(node, 0) + vm.memory_bytes

    def _unindex(self, vm: CachedVm) -> None:
        node = vm.node_name
        if node is None:
            self._unplaced.pop(vm.key, None)
            return
        keys = self._on_node.get(node)
        if keys is not None:
            keys.discard(vm.key)
            if not keys:
                del self._on_node[node]
        left = self._allocated.get(node, 0) - vm.memory_bytes
        if left:
            self._allocated[node] = left
        else:
            self._allocated.pop(node, None)

    def upsert_host(self, body: Mapping[str, Any], *, cached_only: bool = False) -> HostView | None:
        """Store a VMHost; ``None`` (and no change) when it is older than what is cached,
        or, with ``cached_only`` (a write's response), when the cache no longer has it."""
        view = self._with_lease(HostView.from_body(body))
        current = self.hosts.get(view.name)
        if current is None and cached_only:
            return None
        if current is not None and older_version(view.resource_version, current.resource_version):
            return None
        self.hosts[view.name] = view
        return view

    def upsert_lease(self, body: Mapping[str, Any], now: datetime) -> LeaseView | None:
        """Store an agent's Lease (None for other Leases); its host sees the renewal."""
        name = str((body.get("metadata") or {}).get("name") or "")
        previous = self.leases.get(name.removeprefix(LEASE_PREFIX))
        view = LeaseView.from_body(body, now, previous)
        if view is None:
            return None
        self.leases[view.node] = view
        host = self.hosts.get(view.node)
        if host is not None:
            self.hosts[view.node] = self._with_lease(host)
        return view

    def drop_lease(self, node: str) -> None:
        self.leases.pop(node, None)
        host = self.hosts.get(node)
        if host is not None:
            self.hosts[node] = dataclasses.replace(
                host, lease_seen=None, lease_duration=None, fenced=False
            )

    def renew_sightings(self, now: datetime) -> None:
        """Count every Lease as seen renewed at ``now`` (after the controller was blind)."""
        for node, lease in list(self.leases.items()):
            self.leases[node] = dataclasses.replace(lease, seen=now)
            host = self.hosts.get(node)
            if host is not None:
                self.hosts[node] = self._with_lease(host)

    def _with_lease(self, host: HostView) -> HostView:
        lease = self.leases.get(host.name)
        if lease is None:
            return host
        return dataclasses.replace(
            host,
            lease_seen=lease.seen,
            lease_duration=lease.duration,
            fenced=lease.mark is not None,
        )

    def upsert_node(self, body: Mapping[str, Any]) -> NodeView:
        view = NodeView.from_body(body)
        self.nodes[view.name] = view
        return view

    def allocated(self) -> dict[str, int]:
        """Memory (bytes) of the VMs placed on each node, deleting ones included
        (their domains still hold the memory until the agent removes them)."""
        return dict(self._allocated)

    def unplaced(self) -> Iterator[CachedVm]:
        return (self.vms[key] for key in list(self._unplaced))

    def nodes_with_vms(self) -> list[str]:
        return list(self._on_node)

    def placed_on(self, node: str) -> Iterator[CachedVm]:
        return (self.vms[key] for key in list(self._on_node.get(node, ())))
