"""``/metrics`` of the agents and the controller: a registry per process, served by aiohttp.

Each process builds its own :class:`~prometheus_client.CollectorRegistry` (tests make as
many as they like) and serves it from its event loop; collectors read state the process
already keeps (caches, queues, a usage snapshot refreshed by a loop of its own), so a
scrape never calls libvirt or the apiserver.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, TypeVar, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from virtfleet.logs import get_logger
from virtfleet.runtime.addresses import split_listen
from virtfleet.runtime.apisession import kopf_requests
from virtfleet.runtime.kube import KubeClient
from virtfleet.runtime.queue import WorkQueue

__all__ = [
    "MetricsServer",
    "QueueCollector",
    "count_requests",
    "reconcile_histogram",
    "timed",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Reconciles take milliseconds (a status write) to minutes (a QEMU start under load).
RECONCILE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

K = TypeVar("K")
R = TypeVar("R")


def reconcile_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "virtfleet_reconcile_duration_seconds",
        "Time one reconcile of an object took, by kind.",
        ["kind"],
        buckets=RECONCILE_BUCKETS,
        registry=registry,
    )


#: prometheus_client's own value formatting (Go's float syntax), for text written by hand.
go_float = cast(Callable[[float], str], floatToGoString)


def escape_label(value: str) -> str:
    """A label value as the text exposition format quotes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(doc: str) -> str:
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def count_requests(registry: CollectorRegistry, client: object) -> None:
    """Count the process's apiserver requests by client (``virtfleet``: ``client``, a
    :class:`KubeClient`; ``kopf``: kopf's watches and patches), verb, resource and answer."""
    requests = Counter(
        "virtfleet_apiserver_requests",
        "Requests to the apiserver, by client (virtfleet's own or kopf's), verb (WATCH: a "
        "watch stream opened), resource and HTTP code (0: no answer).",
        ["client", "verb", "resource", "code"],
        registry=registry,
    )
    if isinstance(client, KubeClient):
        client.observer = lambda verb, resource, code: requests.labels(
            "virtfleet", verb, resource, str(code)
        ).inc()
    kopf_requests.observer = lambda verb, resource, code: requests.labels(
        "kopf", verb, resource, str(code)
    ).inc()
    events = Counter(
        "virtfleet_watch_events_received",
        "Watch events the apiserver sent this process's kopf streams, by resource (all of "
        "them: before any client-side filter).",
        ["resource"],
        registry=registry,
    )
    received = Counter(
        "virtfleet_watch_received_bytes",
        "Bytes of those watch streams, by resource.",
        ["resource"],
        registry=registry,
    )

    def watched(resource: str, count: int, size: int) -> None:
        events.labels(resource).inc(count)
        received.labels(resource).inc(size)

    kopf_requests.watch_observer = watched


def timed(
    histogram: Histogram, kind: str, fn: Callable[[K], Awaitable[R]]
) -> Callable[[K], Awaitable[R]]:
    """``fn`` observed into ``histogram`` (failures count: they took the time too)."""

    async def run(key: K) -> R:
        started = time.perf_counter()
        try:
            return await fn(key)
        finally:
            histogram.labels(kind).observe(time.perf_counter() - started)

    return run


class QueueCollector(Collector):
    """Depth of the process's work queues: waiting now, and delayed (backing off)."""

    def __init__(self, queues: Callable[[], Mapping[str, WorkQueue[Any]]]) -> None:
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "virtfleet_workqueue_depth", "Keys waiting to be reconciled now.", labels=["queue"]
        )
        delayed = GaugeMetricFamily(
            "virtfleet_workqueue_delayed",
            "Keys waiting for a retry or a timer.",
            labels=["queue"],
        )
        for name, queue in self.queues().items():
            depth.add_metric([name], len(queue))
            delayed.add_metric([name], queue.delayed)
        yield depth
        yield delayed


class MetricsServer:
    """``GET /metrics`` on ``listen`` (plain HTTP, like kubelet's and kopf's probes)."""

    def __init__(self, listen: str, render: Callable[[], bytes], component: str) -> None:
        self.host, self.port = split_listen(listen)
        self.render = render
        self.log = get_logger("virtfleet.runtime.metrics", component=component)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.log.info("metrics serving", listen=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        # In a worker thread: at 10,000 VMs a scrape is ~0.1-0.5 s of formatting, which on
        # the event loop would hold up every reconcile (the collectors read snapshots).
        body = await asyncio.to_thread(self.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
