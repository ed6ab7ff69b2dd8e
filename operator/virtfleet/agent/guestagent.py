"""Asking each running VM's qemu-guest-agent, now and then, what the guest says.

A loop of its own beside the VM reconciles: an agent call can take seconds (libvirt's
agent timeout, see :mod:`virtfleet.hypervisor.guestagent`), which must never hold a
reconcile or a VM's lock. Each answer is kept by VM uid; when it differs from the last
one the VM is queued, and its reconcile puts it into status
(:mod:`virtfleet.reconcile.vm_guest`). A lifecycle event of the domain drops the VM's
answer (it was about a guest that stopped or just started), so status never shows a
stopped guest's addresses; the next round asks again.

It is also the net under quiesced snapshots: a guest whose agent says it is frozen for
longer than ``thaw_after`` seconds (no snapshot freezes that long; an agent that died
between a freeze and its thaw would leave it so, and every write in the guest hangs) is
thawed, with a Warning Event on the VM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from virtfleet.domain.guestagent import GuestAgentReport
from virtfleet.hypervisor import HypervisorError
from virtfleet.hypervisor.guestagent import agent_report, thaw_filesystems
from virtfleet.logs import get_logger

if TYPE_CHECKING:
    from virtfleet.agent.agent import Agent

#: One VM's answer slower than this is no answer (libvirt's own timeout is per command;
#: waiting for the agent's job is not covered by it).
ANSWER_TIMEOUT_S: Final = 15.0


class GuestAgents:
    """The guest agents' last answers on this node, by VM uid."""

    def __init__(
        self,
        agent: Agent,
        interval: float,
        *,
        thaw_after: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.interval = interval
        self.thaw_after = thaw_after
        self.clock = clock
        self.reports: dict[str, GuestAgentReport] = {}
        #: When each frozen guest was first seen frozen (monotonic seconds), by VM uid.
        self.frozen_since: dict[str, float] = {}
        self.log = get_logger("virtfleet.agent.guestagent", node=agent.settings.node_name)

    def report(self, uid: str) -> GuestAgentReport | None:
        return self.reports.get(uid)

    def forget(self, uid: str) -> None:
        self.reports.pop(uid, None)
        self.frozen_since.pop(uid, None)

    async def run(self) -> None:
        while True:
            try:
                await self.ask_all()
            except Exception as exc:  # the loop outlives one bad round; logged
                self.log.exception("guest agent round failed", error=str(exc))
            await asyncio.sleep(self.interval)

    async def ask_all(self) -> None:
        for key, body in list(self.agent.cache.items()):
            uid = str(body["metadata"]["uid"])
            if (body.get("status") or {}).get("printableStatus") != "Running":
                self._drop(uid, key)  # no libvirt call for what does not run
                continue
            report = await self._ask(uid)
            if self.agent.by_uid.get(uid) != key:
                continue  # the VM left the node (or was replaced) while its agent was asked
            if report is None:
                self._drop(uid, key)
            elif self.reports.get(uid) != report:
                self.reports[uid] = report
                self.agent.queue.add(key)
            await self._watch_freeze(uid, key, report)
        known = set(self.agent.by_uid)
        for uid in [u for u in self.reports if u not in known]:
            del self.reports[uid]
        for uid in [u for u in self.frozen_since if u not in known]:
            del self.frozen_since[uid]

    async def _watch_freeze(
        self, uid: str, key: tuple[str, str], report: GuestAgentReport | None
    ) -> None:
        if report is None or not report.frozen:
            self.frozen_since.pop(uid, None)
            return
        now = self.clock()
        since = self.frozen_since.setdefault(uid, now)
        if now - since < self.thaw_after:
            return
        self.frozen_since.pop(uid, None)
        await self._thaw(uid, key, now - since)

    async def _thaw(self, uid: str, key: tuple[str, str], frozen_for: float) -> None:
        """Thaw a guest left frozen; say so on the VM (it lost writes' time, not data)."""
        log = self.log.bind(namespace=key[0], vm=key[1])
        try:
            guest = await self.agent.hv.lookup(uid)
            thawed = await thaw_filesystems(guest) if guest is not None else 0
        except HypervisorError as exc:
            log.warning("frozen guest not thawed", error=str(exc))
            return
        log.warning("frozen guest thawed", filesystems=thawed, frozen_seconds=round(frozen_for))
        body = self.agent.cache.get(key)
        if body is not None:
            await self.agent.kube.record_event(
                body,
                "Warning",
                "GuestThawed",
                f"the guest's filesystems were frozen for {frozen_for:.0f}s (a freeze "
                f"nobody thawed); thawed {thawed}",
                "virtfleet-agent",
            )

    def _drop(self, uid: str, key: tuple[str, str]) -> None:
        if self.reports.pop(uid, None) is not None:
            self.agent.queue.add(key)  # its status must lose what the agent said

    async def _ask(self, uid: str) -> GuestAgentReport | None:
        """The agent's answer, or None when the domain does not run here."""
        try:
            guest = await self.agent.hv.lookup(uid)
            if guest is None or not await guest.is_active():
                return None
            return await asyncio.wait_for(agent_report(guest), ANSWER_TIMEOUT_S)
        except TimeoutError:
            return GuestAgentReport(connected=False, error=f"no answer in {ANSWER_TIMEOUT_S:g}s")
        except HypervisorError as exc:
            self.log.info("guest agent not asked", uid=uid, error=str(exc))
            return self.reports.get(uid)  # libvirt trouble: keep what is known
