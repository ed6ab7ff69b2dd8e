"""The node's own fencing: Lease renewal, self-fencing of HA VMs, the watchdog, and the
recovery after the controller fenced the node (rules: ``reconcile.node_fencing``).

Two tasks: the Lease is renewed every ``lease_renew_seconds``; every second the fence
loop destroys HA VMs' domains when the rules say so and pets the watchdog when they allow
it. After a fence mark the agent keeps renewing; the controller, seeing it back, stops
moving its VMs and clears the mark; then the recovery reads every VM afresh, removes the
stale copies of VMs that failed over (quarantining their node-local disks) and lets the
VMs still placed here start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Mapping
from typing import Any

from virtfleet.agent.agent import COMPONENT, Agent, key_of
from virtfleet.agent.lease import NodeLease
from virtfleet.agent.quarantine import quarantine_pending, quarantine_volumes
from virtfleet.api.virtualmachine import HighAvailability
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.identity import Key
from virtfleet.logs import get_logger
from virtfleet.reconcile import node_fencing as rules
from virtfleet.reconcile.failover import failed_over_from
from virtfleet.runtime.kube import KubeApi, KubeError

#: How often the fence loop looks (and pets the watchdog when allowed).
FENCE_TICK_SECONDS = 1.0
#: A failed recovery after a fence is tried again this much later.
RECOVERY_RETRY_SECONDS = 10.0


def high_availability(body: Mapping[str, Any] | None) -> HighAvailability:
    raw = ((body or {}).get("spec") or {}).get("highAvailability")
    try:
        return HighAvailability(raw) if raw else HighAvailability.NONE
    except ValueError:
        return HighAvailability.NONE


class Watchdog:
    """A watchdog device (``/dev/watchdog``, or the harness's file): each write pets it.

    Armed while the node holds HA VMs; disarmed by the magic close ('V', then close) when
    it holds none, so a node without HA VMs is never reset by it. A process that dies
    leaves it armed: that is the point.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self.log = get_logger("virtfleet.agent.watchdog", device=path)

    @property
    def armed(self) -> bool:
        return self._fd is not None

    def _write(self, fd: int, byte: bytes) -> None:
        """One byte to the device; a regular file (the harness's) keeps only that byte."""
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
        os.write(fd, byte)

    def pet(self) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                self.log.info("watchdog armed")
            self._write(self._fd, b"\0")
        except OSError as exc:
            self.log.warning("watchdog not petted", error=str(exc))

    def disarm(self) -> None:
        if self._fd is None:
            return
        try:
            self._write(self._fd, b"V")
        except OSError as exc:
            self.log.warning("watchdog magic close failed", error=str(exc))
        finally:
            os.close(self._fd)
            self._fd = None
            self.log.info("watchdog disarmed: no HA VM on this node")


class NodeFencing:
    """State and loops of the node's fencing (see the module doc)."""

    def __init__(self, agent: Agent, lease_kube: KubeApi | None = None) -> None:
        self.agent = agent
        self.settings = agent.settings
        # Its own client (own connections and threads) where given: a renewal must not
        # queue behind slow calls of the VM loops, or HA VMs would self-fence for nothing.
        self.lease = NodeLease(lease_kube or agent.kube, agent.settings)
        self.watchdog = (
            Watchdog(self.settings.watchdog_path) if self.settings.watchdog_path else None
        )
        #: uid → "namespace/name" of VMs whose disks this agent quarantined.
        self.quarantined_vms: dict[str, str] = {}
        self._recovery: asyncio.Task[None] | None = None
        self._recover_after = 0.0
        #: This node's VMs were listed once: the cache knows every HA VM.
        self._listed = False
        self.log = get_logger("virtfleet.agent.fencing", node=self.settings.node_name)
        agent.start_holds.append(self.hold)

    # --- what other loops ask -------------------------------------------------------------

    def hold(self, key: Key) -> str | None:
        """A start hold (``Agent.start_holds``) for HA VMs while the Lease does not hold."""
        if high_availability(self.agent.cache.get(key)) is HighAvailability.NONE:
            return None
        return rules.start_hold(self.lease.state, time.monotonic(), self.settings.self_fence_after)

    @property
    def may_sweep(self) -> bool:
        """The orphan sweep runs only once the Lease was read and no fence recovery is
        pending: until then it might delete disks the recovery must quarantine."""
        state = self.lease.state
        return self.lease.resource_version is not None and not (state.fenced or state.recovering)

    # --- loops ----------------------------------------------------------------------------

    async def start(self) -> list[asyncio.Task[None]]:
        """Read the Lease and this node's VMs once (so holds, self-fencing and the watchdog
        know them before kopf's watch does), then the loops."""
        try:
            await self.lease.load()
        except KubeError as exc:
            self.log.warning("Lease not read at start", error=str(exc))
        await self._list_vms()
        return [
            asyncio.create_task(self._renew_loop(), name="lease-renew"),
            asyncio.create_task(self._fence_loop(), name="node-fencing"),
        ]

    async def _list_vms(self) -> None:
        """The node's VMs into the agent's cache (as kopf's first list would): until this
        worked, the agent cannot tell its HA VMs, so it must not vouch for the node."""
        node = self.settings.node_name
        try:
            found = await self.agent.kube.list(
                "VirtualMachine", label_selector=f"virtfleet.io/node={node}"
            )
        except KubeError as exc:
            self.log.warning("VMs not listed yet", error=str(exc))
            return
        for body in found:
            self.agent.on_vm_event(None, body)
        self._listed = True

    async def _renew_loop(self) -> None:
        while True:
            try:
                was_fenced = self.lease.state.fenced
                renewed = await self.lease.renew()
                if renewed and was_fenced != self.lease.state.fenced:
                    self.agent.resync()
            except Exception as exc:  # the loop must outlive one bad pass; logged
                self.log.exception("Lease renewal failed", error=str(exc))
            await asyncio.sleep(self.settings.lease_renew_seconds)

    async def _fence_loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the loop must outlive one bad pass; logged
                self.log.exception("fence pass failed", error=str(exc))
            await asyncio.sleep(FENCE_TICK_SECONDS)

    async def tick(self) -> None:
        if not self._listed:
            await self._list_vms()
        now = time.monotonic()
        state = self.lease.state
        sfa = self.settings.self_fence_after
        ha_active: int | None = None
        if rules.must_self_fence(state, now, sfa):
            # Not listed yet: HA VMs unknown, so none can be counted as stopped (None).
            ha_active = await self._fence_ha_domains() if self._listed else None
        if self.watchdog is not None:
            has_ha = any(
                high_availability(b) is not HighAvailability.NONE for b in self.agent.cache.values()
            )
            if self._listed and not has_ha and not rules.must_self_fence(state, now, sfa):
                self.watchdog.disarm()
            elif rules.pet_watchdog(state, now, sfa, ha_active) and (
                has_ha or self.watchdog.armed or not self._listed
            ):
                # Before the list, too: a previous agent process may have armed it.
                self.watchdog.pet()
        idle = self._recovery is None or self._recovery.done()
        if state.recovering and not state.fenced and now >= self._recover_after and idle:
            # Its own task: copying a quarantined disk may take minutes, and the watchdog
            # must be petted meanwhile.
            self._recovery = asyncio.create_task(self._recover_once(), name="fence-recovery")

    async def _fence_ha_domains(self) -> int | None:
        """Destroy every active domain of an HA VM here; how many are still active
        (None: libvirtd did not answer)."""
        active = 0
        try:
            for key, body in list(self.agent.cache.items()):
                if high_availability(body) is HighAvailability.NONE:
                    continue
                guest = await self.agent.hv.lookup(str(body["metadata"]["uid"]))
                if guest is None or not (await guest.status()).state.active:
                    continue
                try:
                    await guest.destroy()
                    self.log.warning(
                        "self-fenced: HA VM's domain destroyed (the node's Lease does not "
                        "hold; the controller may restart it elsewhere)",
                        namespace=key[0],
                        vm=key[1],
                        fence_mark=self.lease.fence_mark,
                    )
                except hv_errors.HypervisorError as exc:
                    self.log.error("self-fence failed", namespace=key[0], vm=key[1], error=str(exc))
                    active += 1
        except (hv_errors.HypervisorError, OSError) as exc:
            self.log.error("self-fence: libvirtd does not answer", error=str(exc))
            return None
        return active

    # --- after a fence mark -----------------------------------------------------------------

    async def _recover_once(self) -> None:
        try:
            await self.recover()
        except Exception as exc:  # retried with a back-off; logged
            self._recover_after = time.monotonic() + RECOVERY_RETRY_SECONDS
            self.log.exception("fence recovery failed; retrying", error=str(exc))

    async def recover(self) -> None:
        """Once the controller cleared the fence mark (it moves no VM of this node any
        more): read every VM afresh, remove the stale copies of those that failed over and
        quarantine their node-local disks, then let the VMs still placed here start."""
        agent = self.agent
        node = self.settings.node_name
        epoch = self.lease.mark_epoch
        try:
            listed = await agent.kube.list("VirtualMachine")
        except KubeError as exc:
            self.log.info("recovery waits for the VM list", error=str(exc))
            return
        by_uid = {str(vm["metadata"]["uid"]): vm for vm in listed}
        for key, body in list(agent.cache.items()):
            fresh = by_uid.get(str(body["metadata"]["uid"]))
            if fresh is None or not agent.is_mine(fresh):
                agent.forget(key)
            else:
                agent.on_vm_event("MODIFIED", fresh)
        for item in await agent.hv.list_owned():
            vm = by_uid.get(item.guest.uuid)
            where = failed_over_from(vm, node) if vm is not None else None
            if vm is None or where is None:
                continue
            with contextlib.suppress(hv_errors.NotFound):
                if (await item.guest.status()).state.active:
                    await item.guest.destroy()
                await item.guest.undefine()
            message = (
                f"node {node} is back: its stale copy of the VM was destroyed "
                f"(the VM runs on {where} since its failover)"
            )
            self.log.warning("stale copy removed", namespace=key_of(vm)[0], vm=key_of(vm)[1])
            await agent.kube.record_event(vm, "Normal", "StaleCopyRemoved", message, COMPONENT)
        for vm in listed:
            if failed_over_from(vm, node) is None or not await quarantine_pending(agent, vm):
                continue
            kept = await quarantine_volumes(agent, vm)
            if kept:
                ns, name = key_of(vm)
                self.quarantined_vms[str(vm["metadata"]["uid"])] = f"{ns}/{name}"
                message = (
                    f"node {node} is back: its node-local disks of this VM are kept as "
                    f"{', '.join(kept)} (quarantined: they may hold newer data than the "
                    "backup it was restored from); see VMHost " + node
                )
                await agent.kube.record_event(vm, "Warning", "DisksQuarantined", message, COMPONENT)
        if self.lease.recovered(epoch):
            self.log.info("recovered from the fence: stale copies removed")
            agent.resync()
