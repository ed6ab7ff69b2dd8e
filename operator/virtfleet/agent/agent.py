"""The node agent's loop: one level-triggered reconcile per VM, fed by every signal.

kopf watch events, libvirt lifecycle events, a reconnect to libvirtd and a periodic
resync all do the same thing: put the VM's key in a work queue. A worker then reads the
latest object from the cache, observes the domain, asks :func:`virtfleet.reconcile.vm.decide`
what to do, does it, and looks again until a pass decides nothing; the status of that
pass is written if it differs from the stored one (DESIGN §3.2, §3.4).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from virtfleet import manifests
from virtfleet.agent.backupdisk import BackupDisks
from virtfleet.agent.console import ConsoleAddress
from virtfleet.agent.driver import NodeDriver, VmObservation
from virtfleet.agent.errors import ActionError
from virtfleet.agent.guestagent import GuestAgents
from virtfleet.agent.metrics import AgentMetrics
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.vmnetworks import NetworkKeeper, network_names
from virtfleet.api.virtualmachine import VirtualMachineSpec, VirtualMachineStatus
from virtfleet.domain.jobs import JobProgress
from virtfleet.hypervisor import DomainEvent, EventKind, Hypervisor
from virtfleet.identity import POWER_REQUEST_ANNOTATION, Key
from virtfleet.logs import get_logger
from virtfleet.reconcile.claim import Claim, vm_claim
from virtfleet.reconcile.views import slim
from virtfleet.reconcile.vm import Decision, EventNote, PowerRequest, VmView, decide, failed
from virtfleet.reconcile.vm_model import Start
from virtfleet.runtime.failures import error_reporter
from virtfleet.runtime.kube import Forbidden, KubeApi, KubeError, NotFound, secret_value
from virtfleet.runtime.queue import WorkQueue
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest

#: Domain events after which what the guest agent said is about another guest (or none).
GUEST_CHANGED = frozenset(
    {
        EventKind.STARTED,
        EventKind.STOPPED,
        EventKind.SHUTDOWN,
        EventKind.CRASHED,
        EventKind.REBOOT,
        EventKind.UNDEFINED,
    }
)
#: Decide-act passes in one reconcile before handing back to the queue.
MAX_PASSES = 5
COMPONENT = "virtfleet-agent"


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return str(meta["namespace"]), str(meta["name"])


#: What ``kubectl apply`` keeps on every object: a second copy of the spec.
def _labelled(obj: Mapping[str, Any], selector: str) -> bool:
    """``selector`` is ``key=value`` (that value) or ``key`` (any value)."""
    key, sep, value = selector.partition("=")
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return key in labels and (not sep or labels[key] == value)


class Agent:
    """Everything one node agent holds: cache, queue, driver and API access."""

    def __init__(self, settings: AgentSettings, hv: Hypervisor, kube: KubeApi) -> None:
        self.settings = settings
        self.hv = hv
        self.kube = kube
        self.driver = NodeDriver(hv, settings)
        self.driver.backup_disks = BackupDisks(kube, settings)
        #: The guest agents' last answers (asked by their own loop, started with the agent).
        self.guest_agents = GuestAgents(
            self, settings.guest_agent_poll_seconds, thaw_after=settings.guest_thaw_after_seconds
        )
        #: The node's VMNetworks; its host plumbing is given at start (none in unit tests).
        self.networks = NetworkKeeper(self, None)
        self.driver.networks = self.networks
        self.queue: WorkQueue[Key] = WorkQueue(
            name="vms",
            workers=settings.workers,
            on_error=error_reporter(
                kube,
                "VirtualMachine",
                COMPONENT,
                lookup=lambda key: [self.cache[key]] if key in self.cache else [],
                store=lambda _, body: self._store(body),
                cas=False,  # as every status write of the VM's agent
            ),
        )
        self.cache: dict[Key, dict[str, Any]] = {}
        self.by_uid: dict[str, Key] = {}
        self.finalized: dict[Key, asyncio.Event] = {}
        #: Told when a VM leaves the node, so per-VM state elsewhere goes with it.
        self._forget_hooks: list[Callable[[Key], None]] = []
        #: uids of VMs labelled for this node without a placement (logged once each).
        self.unplaced: set[str] = set()
        #: Asked before a VM starts: a reason to keep it stopped, or None (a restore that is
        #: replacing its disks: agent.backups.inplace).
        self.start_holds: list[Callable[[Key], str | None]] = []
        self.log = get_logger("virtfleet.agent", node=settings.node_name)
        #: Where this node serves ``virtfleet console`` (set at start when configured).
        self.console: ConsoleAddress | None = None
        #: Its ``/metrics`` (set at start when configured).
        self.metrics: AgentMetrics | None = None
        #: The last sample of each live migration job running from here, by VMMigration
        #: (with its VM's name): what /metrics shows of migrations in progress.
        self.migration_samples: dict[Key, tuple[str, JobProgress]] = {}

    # --- signals → keys ---------------------------------------------------------------

    def on_vm_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a VM placed on this node (kopf ``on.event``; never retried)."""
        key = key_of(body)
        if event_type == "DELETED":
            self.unplaced.discard(str(body["metadata"].get("uid")))
            self.forget(key)
            return
        claim = vm_claim(body, self.settings.node_name)
        if claim is not Claim.MINE:
            if claim is Claim.UNPLACED:
                self._note_unplaced(body)
            return
        arrives = key not in self.cache
        if not store_newest(self.cache, key, body, shape=slim):
            return  # our own newer write is already cached; this event is older
        if arrives and network_names(body):
            self.networks.kick()  # a member arrives: its networks come up
        self.by_uid[str(body["metadata"]["uid"])] = key
        self.queue.add(key)

    def is_mine(self, body: Mapping[str, Any]) -> bool:
        """Placed here by the controller: label *and* ``status.nodeName`` (reconcile.claim)."""
        return vm_claim(body, self.settings.node_name) is Claim.MINE

    def never_placed(self, key: Key, body: Mapping[str, Any]) -> bool:
        """A VM labelled for this node that the agent never took (no placement, not cached).

        Its deletion has nothing to wait for: no domain or volume was made for it here.
        """
        return key not in self.cache and vm_claim(body, self.settings.node_name) is Claim.UNPLACED

    def _note_unplaced(self, body: Mapping[str, Any]) -> None:
        """Say once per VM that its label alone does not make it this node's."""
        uid = str(body["metadata"]["uid"])
        if uid in self.unplaced:
            return
        self.unplaced.add(uid)
        namespace, name = key_of(body)
        self.log.warning(
            "VM labelled for this node but not placed by the controller: ignored "
            "(no status.nodeName; the label alone never makes a VM this node's)",
            namespace=namespace,
            vm=name,
            uid=uid,
        )

    def _store(self, body: Mapping[str, Any]) -> None:
        """A VM as just written, into the cache (if it is still this node's)."""
        store_newest(self.cache, key_of(body), body, shape=slim, cached_only=True)

    def forget(self, key: Key) -> None:
        """Drop a VM that left this node (migrated away): no more reconciles of it here.

        Needed because the watch is filtered by the node label: once the label names
        another node, this agent gets no event saying the VM is not its own any more.
        """
        old = self.cache.pop(key, None)
        if old is not None:
            self.by_uid.pop(str(old["metadata"]["uid"]), None)
            self.guest_agents.forget(str(old["metadata"]["uid"]))
            self.driver.observations.forget(str(old["metadata"]["uid"]))
            if network_names(old):
                self.networks.kick()  # maybe the last member of a network left
        self.queue.forget(key)
        self.finalized.pop(key, None)  # a later VM of the same name starts afresh
        for hook in self._forget_hooks:
            hook(key)

    def on_forget(self, hook: Callable[[Key], None]) -> None:
        """Run ``hook(key)`` whenever a VM leaves the node (deleted, migrated away)."""
        self._forget_hooks.append(hook)

    def bookkeeping(self) -> dict[str, int]:
        """Entries per structure kept per VM (what must return to 0 with the VMs)."""
        return {
            "vms": len(self.cache),
            "vm_uids": len(self.by_uid),
            "vm_finalized": len(self.finalized),
            "vm_unplaced": len(self.unplaced),
            "vm_observations": len(self.driver.observations),
            "vm_queue": self.queue.tracked,
            "network_incoming": len(self.networks.incoming),
            "guest_agent_reports": len(self.guest_agents.reports),
            "frozen_guests": len(self.guest_agents.frozen_since),
            "metrics_devices": self.metrics.tracked if self.metrics is not None else 0,
            "migration_samples": len(self.migration_samples),
        }

    async def on_domain_event(self, event: DomainEvent) -> None:
        key = self.by_uid.get(event.uuid)
        if key is not None:
            if event.event in GUEST_CHANGED:
                self.guest_agents.forget(event.uuid)  # about a guest that is gone or new
            self.queue.add(key)

    async def on_reconnect(self, reconnect: bool) -> None:
        """Events were lost while disconnected: look at everything again."""
        if reconnect:
            self.log.info("libvirt reconnected; resyncing all VMs")
        self.resync()

    def resync(self) -> None:
        for key in list(self.cache):
            self.queue.add(key)

    async def wait_finalized(self, key: Key, timeout: float) -> bool:
        """For the kopf deletion handler: True once the VM's domain and volumes are gone."""
        done = self.finalized.setdefault(key, asyncio.Event())
        self.queue.add(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        return done.is_set()

    # --- the reconcile ----------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        """One VM: decide and act until converged; returns when to look again."""
        body = self.cache.get(key)
        if body is None:
            return None
        view = await self._view(body)
        log = self.log.bind(namespace=key[0], vm=key[1], uid=view.uid)
        decision: Decision | None = None
        for _ in range(MAX_PASSES):
            try:
                observation = await self.driver.observe(view, await self._user_data(view))
            except ActionError as exc:
                return await self._failed(body, view, exc)
            decision = decide(view, observation.observed, datetime.now(UTC))
            held = self._start_now_held(view, decision)
            if held is not None:
                # A hold came after the view was made (a node's Lease that just ran out,
                # a restore that just committed): decide again with it, so nothing of the
                # start (status, a consumed power request) is written.
                view = VmView(**{**view.__dict__, "start_held": held})
                continue
            await self._events(body, decision.events)
            view = VmView(**{**view.__dict__, "status": decision.status})
            if not decision.actions:
                break
            log.info("acting", actions=[type(a).__name__ for a in decision.actions])
            try:
                await self._act(view, observation, decision)
            except ActionError as exc:
                return await self._failed(body, view, exc)
            if decision.finalized:
                if key in self.cache:  # not when its DELETED event came meanwhile
                    self.finalized.setdefault(key, asyncio.Event()).set()
                return None
        assert decision is not None
        await self._write_status(body, decision.status)
        return decision.requeue_after if decision.actions == () else 0.5

    def _start_now_held(self, view: VmView, decision: Decision) -> str | None:
        """The hold on a start the decision asks for, if one came since ``view``."""
        if view.start_held or not any(isinstance(a, Start) for a in decision.actions):
            return None
        return self.held((view.namespace, view.name))

    async def _act(self, view: VmView, observation: VmObservation, decision: Decision) -> None:
        for action in decision.actions:
            await self.driver.execute(view, observation, action)

    async def _view(self, body: Mapping[str, Any]) -> VmView:
        meta = body["metadata"]
        status = VirtualMachineStatus.model_validate(body.get("status") or {})
        spec: VirtualMachineSpec | None = None
        invalid: str | None = None
        try:
            spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            invalid = "; ".join(
                f"spec.{manifests.field_path(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()
            )
        return VmView(
            namespace=str(meta["namespace"]),
            name=str(meta["name"]),
            uid=str(meta["uid"]),
            generation=int(meta.get("generation", 1)),
            node=self.settings.node_name,
            spec=spec,
            status=status,
            deleting=bool(meta.get("deletionTimestamp")),
            invalid=invalid,
            power_request=PowerRequest.parse(
                (meta.get("annotations") or {}).get(POWER_REQUEST_ANNOTATION)
            ),
            start_held=self.held((str(meta["namespace"]), str(meta["name"]))),
            addresses=self.networks.addresses(str(meta["uid"]), spec) if spec else {},
            guest=self.guest_agents.report(str(meta["uid"])),
            console=self.console.endpoint(str(meta["namespace"]), str(meta["name"]))
            if self.console is not None
            else None,
        )

    def held(self, key: Key) -> str | None:
        """Why the VM must not start, migrate or be snapshotted now (None: it may)."""
        for hold in self.start_holds:
            reason = hold(key)
            if reason:
                return reason
        return None

    async def _user_data(self, view: VmView) -> str | None:
        if view.spec is None or view.spec.cloud_init is None or view.deleting:
            return None
        ref = view.spec.cloud_init.user_data_secret_ref
        if ref is None:
            return None
        where = f"cloudInit.userDataSecretRef: secret {ref.name!r}"
        try:
            secret = await self.kube.get("Secret", view.namespace, ref.name)
            required = self.settings.cloud_init_secret_label
            if required is not None and not _labelled(secret, required):
                raise ActionError(
                    "SecretNotLabelled",
                    f"{where} does not carry the label {required} that this cluster "
                    "requires of Secrets used as cloud-init user-data (the Secret's owner "
                    "opts in by labelling it)",
                    permanent=True,
                )
            raw = secret_value(secret, ref.key)
        except NotFound as exc:
            raise ActionError(
                "SecretNotFound", f"{where} or key {ref.key!r} not found", permanent=False
            ) from exc
        except Forbidden as exc:
            raise ActionError(
                "SecretForbidden",
                f"{where}: this node's agent may not read it (the chart's "
                "agent.rbac.readSecrets is off)",
                permanent=True,
            ) from exc
        except KubeError as exc:
            raise ActionError("SecretUnreadable", f"{where}: {exc}", permanent=False) from exc
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise ActionError(
                "SecretNotUTF8",
                f"{where}, key {ref.key!r}: not UTF-8 text (byte {exc.start}); cloud-init "
                "user-data must be text",
                permanent=True,
            ) from exc

    async def _failed(
        self, body: Mapping[str, Any], view: VmView, exc: ActionError
    ) -> float | None:
        self.log.warning(
            "reconcile failed",
            namespace=view.namespace,
            vm=view.name,
            reason=exc.reason,
            error=exc.message,
            permanent=exc.permanent,
        )
        status = failed(
            view, exc.reason, exc.message, permanent=exc.permanent, now=datetime.now(UTC)
        )
        await self._events(body, (EventNote("Warning", exc.reason, exc.message),))
        await self._write_status(body, status)
        # Permanent problems wait for a spec change (an update event); others retry.
        return self.settings.resync_seconds if exc.permanent else 5.0

    async def _write_status(self, body: Mapping[str, Any], status: VirtualMachineStatus) -> None:
        """Write what differs from the newest copy known (the controller may have written
        since ``body`` was read: its ``Unknown`` must be overwritten, not diffed away)."""
        key = key_of(body)
        current = self.cache.get(key, body)
        patch = status_patch(current.get("status"), status.to_wire())
        if patch is None:
            return
        namespace, name = key
        try:
            updated = await self.kube.patch_status("VirtualMachine", namespace, name, patch)
        except NotFound:
            return
        store_newest(self.cache, key, updated, shape=slim, cached_only=True)
        if self.metrics is not None:
            self.metrics.status_written(current, status)

    async def _events(self, body: Mapping[str, Any], events: tuple[EventNote, ...]) -> None:
        for note in events:
            try:
                await self.kube.record_event(body, note.type, note.reason, note.message, COMPONENT)
            except Exception as exc:  # an Event is best effort, never a failure
                meta = body.get("metadata") or {}
                self.log.warning(
                    "event not recorded",
                    namespace=meta.get("namespace"),
                    vm=meta.get("name"),
                    reason=note.reason,
                    error=str(exc),
                )
