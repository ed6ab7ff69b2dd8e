"""VMNetworks: VNIs, the IPAM record, and which VMs may be placed on them.

Decisions are pure (:mod:`virtfleet.reconcile.network_ipam`); this module keeps the
cached VMNetworks, an index of which VM interfaces name which network, and writes each
network's status with a compare-and-swap (resourceVersion), so a stale view never
overwrites a newer allocation. One worker: VNI assignment looks at every network, and
two concurrent passes could hand out the same free VNI.

Placement asks :meth:`NetworkController.hold` before it places a VM: the VM waits until
every network it names exists, allows its namespace and lists the VM's addresses in
``status.addresses`` (the agent reads them before it starts the VM). When a network's
status changes, the unplaced VMs that name it are enqueued again.

Deletion: every VMNetwork carries the controller's finalizer
(:data:`~virtfleet.identity.NETWORK_FINALIZER`). A deleted network keeps its VNI and
addresses, attaches no one new, and loses the finalizer (and so goes) once no
VirtualMachine names it any more — deleting or editing those VMs releases it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from virtfleet.api.conditions import ConditionStatus, ConditionType, read_conditions
from virtfleet.api.network import NetworkAddress, VMNetworkSpec
from virtfleet.api.resources import VM_NETWORK
from virtfleet.identity import NETWORK_FINALIZER, Key
from virtfleet.logs import get_logger
from virtfleet.reconcile.network_ipam import (
    Allocation,
    Attachment,
    NetworkState,
    NetworkVni,
    Refusal,
    allocate,
    assign_vnis,
    attachment_hold,
    network_status,
    spec_problem,
)
from virtfleet.reconcile.placement import INVALID_SPEC, Unschedulable
from virtfleet.reconcile.views import CachedVm
from virtfleet.runtime.kube import Conflict, KubeApi, NotFound
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest

#: Retry after losing a compare-and-swap: the watch brings the newer object soon.
CONFLICT_RETRY = 1.0
_log = get_logger("virtfleet.controller.networks")
#: Retry of the initial VM listing.
PRIME_RETRY = 2.0
#: Ready reasons of a network that VMs cannot use until someone changes something.
_UNUSABLE = frozenset({"VniConflict", INVALID_SPEC})


def attachments_of(vm: Mapping[str, Any]) -> dict[str, tuple[Attachment, ...]]:
    """``{network name: its attachments}`` of one VM body (lenient: the schema checked it)."""
    meta = vm.get("metadata") or {}
    spec = vm.get("spec") or {}
    out: dict[str, list[Attachment]] = {}
    for nic in spec.get("interfaces") or () if isinstance(spec, Mapping) else ():
        if not isinstance(nic, Mapping) or nic.get("type") != "network":
            continue
        network = nic.get("network")
        if not isinstance(network, str) or not network:
            continue
        out.setdefault(network, []).append(
            Attachment(
                created=str(meta.get("creationTimestamp") or ""),
                namespace=str(meta.get("namespace") or ""),
                vm=str(meta.get("name") or ""),
                uid=str(meta.get("uid") or ""),
                interface=str(nic.get("name") or ""),
                deleting=bool(meta.get("deletionTimestamp")),
            )
        )
    return {name: tuple(items) for name, items in out.items()}


def _spec(body: Mapping[str, Any]) -> tuple[VMNetworkSpec | None, str | None]:
    try:
        return VMNetworkSpec.model_validate(body.get("spec") or {}), None
    except ValidationError as exc:
        return None, f"spec cannot be read: {exc.errors()[0].get('msg', exc)}"


def _addresses(status: Mapping[str, Any]) -> list[NetworkAddress]:
    out = []
    for raw in status.get("addresses") or ():
        try:
            out.append(NetworkAddress.model_validate(raw))
        except ValidationError as exc:  # dropped, and so rewritten: say so
            _log.warning("unreadable IPAM record dropped", record=str(raw), error=str(exc))
    return out


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


class NetworkController:
    """VMNetwork status and finalizer, and the network side of placement (module doc).

    ``wake`` enqueues VMs in the controller's VM queue (given, not imported, so this
    module does not depend on the one that owns it).
    """

    def __init__(
        self,
        kube: KubeApi,
        vms: Mapping[Key, CachedVm],
        wake: Callable[[Iterable[Key]], None],
        clock: Callable[[], datetime],
    ) -> None:
        self.kube = kube
        self.vms = vms
        self.wake = wake
        self.clock = clock
        #: VMNetwork bodies by name.
        self.cache: dict[str, dict[str, Any]] = {}
        #: Network name → VM → that VM's interfaces on it.
        self._attached: dict[str, dict[Key, tuple[Attachment, ...]]] = {}
        self._by_vm: dict[Key, dict[str, tuple[Attachment, ...]]] = {}
        #: The last allocation's refusals per network (exhausted, not allowed).
        self._refused: dict[str, Mapping[tuple[str, str], Refusal]] = {}
        self.queue: WorkQueue[str] = WorkQueue(name="networks", workers=1)
        self.log = get_logger("virtfleet.controller.networks")
        #: Set once every VM the apiserver had is indexed: before that, an allocation
        #: would release the addresses of VMs not seen yet (and hand them out again).
        self.primed = asyncio.Event()
        #: VMs deleted before priming ended: the listing must not bring them back.
        self._deleted_early: set[Key] = set()

    # --- intake ----------------------------------------------------------------------------

    def event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str(_meta(body).get("name") or "")
        old = self.cache.get(name)
        if event_type == "DELETED":
            self.cache.pop(name, None)
            self._refused.pop(name, None)
            self.queue.forget(name)
            self._wake_unplaced(name)
            self._enqueue_all()  # a VNI is free again (a conflict may resolve)
            return
        store_newest(self.cache, name, body)
        if old is None or _meta(old).get("generation") != _meta(body).get("generation"):
            self._enqueue_all()  # a new or changed spec may move VNIs of others
        else:
            self.queue.add(name)
        self._wake_unplaced(name)

    def vm_changed(self, key: Key, body: Mapping[str, Any] | None) -> None:
        """A VM appeared, changed or went (``None``): the networks it names, before and after."""
        if body is None and not self.primed.is_set():
            self._deleted_early.add(key)
        before = self._by_vm.pop(key, {})
        after = attachments_of(body) if body is not None else {}
        if after:
            self._by_vm[key] = after
        if before == after:
            return
        for name in before.keys() - after.keys():
            self._attached.get(name, {}).pop(key, None)
            if not self._attached.get(name):
                self._attached.pop(name, None)
        for name, items in after.items():
            self._attached.setdefault(name, {})[key] = items
        for name in before.keys() | after.keys():
            if name in self.cache:
                self.queue.add(name)

    def resync(self) -> None:
        self._enqueue_all()

    async def run(self) -> None:
        """Index every VM, then reconcile networks (the controller's network worker)."""
        await self.prime()
        await self.queue.run(self.reconcile)

    async def prime(self) -> None:
        """The VMs as the apiserver lists them, indexed before any network is reconciled
        (the VM watch may not have delivered them all yet); retried until it answers."""
        while True:
            try:
                listed = await self.kube.list("VirtualMachine")
                break
            except Exception as exc:  # the apiserver away: nothing may be allocated yet
                self.log.warning("cannot list VMs; networks wait", error=str(exc))
                await asyncio.sleep(PRIME_RETRY)
        for body in listed:
            meta = _meta(body)
            key: Key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if key in self.vms or key in self._by_vm or key in self._deleted_early:
                continue  # the watch was first: it is newer
            self.vm_changed(key, body)
        self.primed.set()
        self._deleted_early.clear()
        self.log.info("networks primed", vms=len(listed))
        self._enqueue_all()

    def _enqueue_all(self) -> None:
        for name in self.cache:
            self.queue.add(name)

    def _wake_unplaced(self, name: str) -> None:
        keys = [
            key
            for key in self._attached.get(name, {})
            if (vm := self.vms.get(key)) is not None and vm.node_name is None
        ]
        if keys:
            self.wake(keys)

    # --- placement -------------------------------------------------------------------------

    def state(self, name: str) -> NetworkState | None:
        body = self.cache.get(name)
        if body is None:
            return None
        status = body.get("status") or {}
        spec, _ = _spec(body)
        ready = next((c for c in read_conditions(status) if c.type == ConditionType.READY), None)
        not_ready = (
            ready.message
            if ready is not None
            and ready.status != ConditionStatus.TRUE
            and ready.reason in _UNUSABLE
            else None
        )
        vni = status.get("vni")
        return NetworkState(
            spec=spec,
            vni=vni if isinstance(vni, int) else None,
            deleting=bool(_meta(body).get("deletionTimestamp")),
            not_ready=not_ready,
            addresses={(a.uid, a.interface): a.address for a in _addresses(status)},
            refused=self._refused.get(name, {}),
        )

    def hold(self, vm: CachedVm) -> Unschedulable | None:
        """Why ``vm`` may not be placed because of a network it names; None if it may."""
        for name, items in sorted(attachments_of(vm.body).items()):
            state = self.state(name)
            for attachment in items:
                outcome = attachment_hold(name, state, attachment)
                if outcome is not None:
                    return outcome
        return None

    # --- reconcile -------------------------------------------------------------------------

    async def reconcile(self, name: str) -> float | None:
        body = self.cache.get(name)
        if body is None:
            return None
        meta = _meta(body)
        deleting = bool(meta.get("deletionTimestamp"))
        attachments = [a for items in self._attached.get(name, {}).values() for a in items]
        finalizers = list(meta.get("finalizers") or [])
        try:
            if deleting and not attachments:
                if NETWORK_FINALIZER in finalizers:
                    finalizers.remove(NETWORK_FINALIZER)
                    await self._patch_finalizers(name, body, finalizers)
                    self.log.info("network released: no VM names it", network=name)
                return None
            if not deleting and NETWORK_FINALIZER not in finalizers:
                body = await self._patch_finalizers(name, body, [*finalizers, NETWORK_FINALIZER])
        except Conflict:
            return CONFLICT_RETRY
        except NotFound:
            return None
        return await self._write_status(name, body, attachments, deleting)

    def _vnis(self, name: str) -> tuple[int | None, str | None]:
        views = []
        for other, body in self.cache.items():
            spec, _ = _spec(body)
            status_vni = (body.get("status") or {}).get("vni")
            views.append(
                NetworkVni(
                    name=other,
                    created=str(_meta(body).get("creationTimestamp") or ""),
                    spec_vni=spec.vni if spec is not None else None,
                    status_vni=status_vni if isinstance(status_vni, int) else None,
                )
            )
        assignment = assign_vnis(views)
        return assignment.vnis.get(name), assignment.conflicts.get(name)

    async def _write_status(
        self, name: str, body: Mapping[str, Any], attachments: list[Attachment], deleting: bool
    ) -> float | None:
        stored = body.get("status") or {}
        spec, spec_error = _spec(body)
        vni, conflict = self._vnis(name)
        problem: tuple[str, str] | None = None
        # An unreadable spec changes nothing held: the record stays as it is.
        allocation = Allocation(
            addresses=tuple(_addresses(stored)), dhcp_address=stored.get("dhcpAddress")
        )
        if spec is None:
            problem = (INVALID_SPEC, spec_error or "spec cannot be read")
        else:
            if deleting:  # keep what is held; attach no one new
                attachments = [dataclasses.replace(a, deleting=True) for a in attachments]
            allocation = allocate(name, spec, _addresses(stored), attachments)
            unusable = spec_problem(spec)
            if conflict is not None:
                problem = ("VniConflict", conflict)
            elif unusable is not None:
                problem = (INVALID_SPEC, unusable)
        self._refused[name] = allocation.refused
        wanted = network_status(
            stored,
            int(_meta(body).get("generation") or 1),
            vni=vni,
            problem=problem,
            allocation=allocation,
            deleting=deleting,
        )
        patch = status_patch(stored, wanted)
        if patch is None:
            return None
        try:
            updated = await self.kube.patch_status(
                VM_NETWORK.kind,
                None,
                name,
                patch,
                resource_version=str(_meta(body).get("resourceVersion") or ""),
            )
        except Conflict:
            return CONFLICT_RETRY
        except NotFound:
            return None
        self.log.info(
            "network status written",
            network=name,
            vni=vni,
            addresses=len(allocation.addresses),
            refused=len(allocation.refused),
        )
        store_newest(self.cache, name, updated, cached_only=True)
        self._wake_unplaced(name)
        return None

    async def _patch_finalizers(
        self, name: str, body: Mapping[str, Any], finalizers: list[str]
    ) -> dict[str, Any]:
        """Replace the finalizer list (compare-and-swap: never drop another's); the body after."""
        metadata = {
            "finalizers": finalizers,
            "resourceVersion": str(_meta(body).get("resourceVersion") or ""),
        }
        updated = await self.kube.patch(VM_NETWORK.kind, None, name, {"metadata": metadata})
        store_newest(self.cache, name, updated, cached_only=True)
        return updated
