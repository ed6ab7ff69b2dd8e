"""This node's heartbeat Lease (``coordination.k8s.io/v1``): renewed with compare-and-swap.

The Lease is the fencing protocol's record (docs/failover.md, ``reconcile.node_fencing``):
the agent renews it; the controller, once the renewals stopped long enough, writes a fence
mark into it. Both writes carry the resourceVersion they read, so exactly one of "the
agent renewed" and "the controller fenced" wins, and each side learns the other's write.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from virtfleet.agent.settings import AgentSettings
from virtfleet.logs import get_logger
from virtfleet.reconcile.node_fencing import (
    FENCED_ANNOTATION,
    SELF_FENCE_ANNOTATION,
    WATCHDOG_ANNOTATION,
    LeaseState,
)
from virtfleet.reconcile.views import parse_time
from virtfleet.runtime.kube import Conflict, KubeApi, KubeError, NotFound

LEASE = "Lease"


def lease_name(node: str) -> str:
    return f"virtfleet-agent-{node}"


def micro_time(moment: datetime) -> str:
    """The apiserver's MicroTime format (RFC 3339 with microseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeLease:
    """Renews ``kube-node-lease/virtfleet-agent-<node>``; keeps :class:`LeaseState`."""

    def __init__(self, kube: KubeApi, settings: AgentSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.namespace = settings.lease_namespace
        self.name = lease_name(settings.node_name)
        self.resource_version: str | None = None
        self.state = LeaseState(last_sent=None, fenced=False, recovering=False)
        #: The fence mark as the controller wrote it (time and reason), for messages.
        self.fence_mark: str | None = None
        #: Counts the fence marks seen: a recovery that began before the latest one does
        #: not end the recovering state (the controller may have moved more VMs since).
        self.mark_epoch = 0
        self._failing_since: float | None = None
        self.log = get_logger("virtfleet.agent.lease", node=settings.node_name)

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _annotations(self) -> dict[str, str | None]:
        s = self.settings
        return {
            SELF_FENCE_ANNOTATION: None
            if s.self_fence_after is None
            else f"{s.self_fence_after:g}",
            WATCHDOG_ANNOTATION: (
                None if s.watchdog_path is None else f"{s.watchdog_timeout_seconds:g}"
            ),
        }

    def _spec(self, now: datetime) -> dict[str, Any]:
        return {
            "holderIdentity": f"virtfleet-agent/{self.settings.node_name}",
            "leaseDurationSeconds": max(1, round(self.settings.lease_seconds)),
            "renewTime": micro_time(now),
        }

    def _absorb(self, body: dict[str, Any], *, sent: float | None) -> None:
        meta = body.get("metadata") or {}
        self.resource_version = str(meta.get("resourceVersion") or "") or None
        mark = (meta.get("annotations") or {}).get(FENCED_ANNOTATION)
        fenced = bool(mark)
        if fenced and str(mark) != self.fence_mark:
            self.mark_epoch += 1
            self.log.warning("the controller fenced this node", mark=mark)
        self.fence_mark = str(mark) if mark else None
        if not fenced and self.state.fenced:
            self.log.info("the controller cleared the fence mark")
        recovering = self.state.recovering or fenced
        last = self.state.last_sent if sent is None else sent
        self.state = LeaseState(last_sent=last, fenced=fenced, recovering=recovering)

    async def load(self) -> None:
        """Read (or create) the Lease. A process that finds its node's Lease takes the last
        renewal the previous process made as its own: its guarantees still run from it."""
        try:
            body = await self.kube.get(LEASE, self.namespace, self.name)
        except NotFound:
            now = datetime.now(UTC)
            sent = time.monotonic()
            spec = {**self._spec(now), "acquireTime": micro_time(now)}
            annotations = {k: v for k, v in self._annotations().items() if v is not None}
            body = await self.kube.create(
                LEASE,
                {
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "annotations": annotations,
                    },
                    "spec": spec,
                },
            )
            self._absorb(body, sent=sent)
            return
        renewed = parse_time((body.get("spec") or {}).get("renewTime"))
        previous: float | None = None
        if self.state.last_sent is None and renewed is not None:
            age = (datetime.now(UTC) - renewed).total_seconds()
            previous = time.monotonic() - max(0.0, age)
        self._absorb(body, sent=previous)

    async def renew(self) -> bool:
        """One renewal (compare-and-swap); True when it was written."""
        try:
            if self.resource_version is None:
                await self.load()
            for _ in range(2):
                sent = time.monotonic()
                patch = {
                    "metadata": {
                        "resourceVersion": self.resource_version,
                        "annotations": self._annotations(),
                    },
                    "spec": self._spec(datetime.now(UTC)),
                }
                try:
                    body = await self.kube.patch(LEASE, self.namespace, self.name, patch)
                except Conflict:
                    await self.load()  # someone else wrote it: the controller's fence mark?
                    continue

                self._absorb(body, sent=sent)
                if self._failing_since is not None:
                    self.log.info(
                        "Lease renewed again",
                        after_seconds=round(time.monotonic() - self._failing_since, 1),
                    )
                    self._failing_since = None
                return True
            self.log.warning("Lease not renewed: it changed under two attempts", lease=self.where)
        except NotFound:
            self.resource_version = None  # deleted: created again on the next renewal
        except KubeError as exc:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self.log.warning("Lease not renewed", lease=self.where, error=str(exc))
        return False

    def recovered(self, epoch: int) -> bool:
        """The recovery that began at mark ``epoch`` is done; False (still recovering)
        when another mark came meanwhile."""
        if epoch != self.mark_epoch or self.state.fenced:
            return False
        self.state = replace(self.state, recovering=False)
        return True
