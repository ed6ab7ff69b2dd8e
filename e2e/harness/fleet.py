"""Many VirtualMachines at once: create, watch, delete, and count the apiserver's writes.

kubectl costs a process per call (~100 ms), too slow and too coarse for hundreds of VMs
and millisecond latencies, so this module talks to the apiserver with the official
Python client (the admin kubeconfig of the harness).

Timing method (:class:`VmWatch`): one watch on the namespace, opened *before* the first
create, records for every VM the client's monotonic clock when an event first shows
``status.printableStatus == Running``; the creator records the same clock right before
each POST. Both clocks are this process's, so a latency is exact to the millisecond and
includes the watch's delivery (a few ms), unlike ``metadata.creationTimestamp`` (whole
seconds) or condition ``lastTransitionTime`` (seconds too, and the agent's clock).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client, config, watch
from kubernetes.client import ApiException

GROUP, VERSION, PLURAL = "virtfleet.io", "v1alpha1", "virtualmachines"
RUNNING = "Running"
NODE_LABEL = "virtfleet.io/node"
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")


def api_client(env: Mapping[str, str]) -> client.ApiClient:
    """A client of the harness's apiserver; its pool is sized for parallel creates."""
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=env["KUBECONFIG"], client_configuration=configuration
    )
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def create_namespace(api: client.ApiClient, name: str) -> None:
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    client.CoreV1Api(api).create_namespace(body)


def delete_namespace(api: client.ApiClient, name: str) -> None:
    """Gone or going: 404 (no such namespace) and 409 (already terminating) are done."""
    try:
        client.CoreV1Api(api).delete_namespace(name)
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise


def create(api: client.ApiClient, namespace: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    objects = client.CustomObjectsApi(api)
    created = objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dict(manifest)
    )
    return cast(dict[str, Any], created)


def create_many(
    api: client.ApiClient, namespace: str, manifests: Iterable[Mapping[str, Any]], workers: int = 8
) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda m: create(api, namespace, m), manifests))


def patch(api: client.ApiClient, namespace: str, name: str, body: Mapping[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, dict(body)
    )


def delete(api: client.ApiClient, namespace: str, name: str) -> None:
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


def run_parallel(fn: Callable[[str], Any], names: Iterable[str], workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, names))


def list_vms(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    result = client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )
    return list(cast(dict[str, Any], result).get("items", []))


def list_all_vms(api: client.ApiClient) -> list[dict[str, Any]]:
    result = client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, PLURAL)
    return list(cast(dict[str, Any], result).get("items", []))


def is_running(vm: Mapping[str, Any]) -> bool:
    status = vm.get("status") or {}
    return bool(status.get("printableStatus") == RUNNING)


def is_ready(vm: Mapping[str, Any]) -> bool:
    status = vm.get("status") or {}
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


@dataclass
class VmWatch:
    """A background watch of one namespace's VMs: when each was first seen Running/Ready.

    ``predicate`` decides what "there" means for the caller (default: Running and the
    status written for the current generation).
    """

    api: client.ApiClient
    namespace: str
    predicate: Callable[[Mapping[str, Any]], bool] = is_running
    seen_at: dict[str, float] = field(default_factory=dict)  # name -> monotonic time
    #: Earlier milestones, by name: when each VM first satisfied that predicate.
    milestones: Mapping[str, Callable[[Mapping[str, Any]], bool]] = field(default_factory=dict)
    milestone_at: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Watch events seen per VM (ADDED, MODIFIED, DELETED).
    events: dict[str, int] = field(default_factory=dict)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: threading.Event = field(default_factory=threading.Event)

    def start(self) -> VmWatch:
        self._thread = threading.Thread(target=self._run, name="vm-watch", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise TimeoutError("the VM watch did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def reset(self, predicate: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        """Forget when VMs were seen (e.g. before an agent restart); keep the objects."""
        with self._lock:
            self.seen_at.clear()
            if predicate is not None:
                self.predicate = predicate
            for name, vm in self.latest.items():
                if self.predicate(vm):
                    self.seen_at[name] = time.monotonic()

    def _run(self) -> None:
        objects = client.CustomObjectsApi(self.api)
        resource_version = ""
        while not self._stop.is_set():
            if not resource_version:
                listing = cast(
                    dict[str, Any],
                    objects.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL),
                )
                for vm in listing.get("items", []):
                    self._seen(vm)
                resource_version = listing["metadata"]["resourceVersion"]
                self._started.set()
            stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in stream.stream(
                    objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    resource_version=resource_version,
                    timeout_seconds=5,
                    allow_watch_bookmarks=True,
                ):
                    obj = event["object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        name = obj["metadata"]["name"]
                        self.events[name] = self.events.get(name, 0) + 1
                    if event["type"] == "DELETED":
                        with self._lock:
                            self.deleted.add(obj["metadata"]["name"])
                            self.latest.pop(obj["metadata"]["name"], None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._seen(obj)
                    if self._stop.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:  # expired: list again
                    resource_version = ""
                else:
                    time.sleep(0.5)
            finally:
                stream.stop()

    def _seen(self, vm: dict[str, Any]) -> None:
        now = time.monotonic()
        name = vm["metadata"]["name"]
        with self._lock:
            self.latest[name] = vm
            self.deleted.discard(name)
            if name not in self.seen_at and self.predicate(vm):
                self.seen_at[name] = now
            for milestone, reached in self.milestones.items():
                times = self.milestone_at.setdefault(milestone, {})
                if name not in times and reached(vm):
                    times[name] = now

    def count_seen(self, names: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for n in names if n in self.seen_at)

    def wait_all(self, names: Iterable[str], timeout: float) -> bool:
        wanted = list(names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count_seen(wanted) == len(wanted):
                return True
            time.sleep(0.05)
        return self.count_seen(wanted) == len(wanted)

    def wait_deleted(self, names: Iterable[str], timeout: float) -> bool:
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if wanted <= self.deleted:
                    return True
            time.sleep(0.1)
        return False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least 1
    return ordered[int(min(rank, len(ordered))) - 1]


# --- the apiserver's write counters -----------------------------------------------------------

_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def write_counts(api: client.ApiClient) -> dict[tuple[str, str, str], float]:
    """``apiserver_request_total`` of write verbs, summed by (verb, resource, subresource)."""
    method, url, headers, body, post = api.param_serialize(
        "GET", "/metrics", auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, headers, body, post)
    text = cast(bytes, response.read()).decode()  # type: ignore[no-untyped-call]
    counts: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("verb") not in WRITE_VERBS:
            continue
        key = (labels["verb"], labels.get("resource", ""), labels.get("subresource", ""))
        counts[key] = counts.get(key, 0.0) + float(match["value"])
    return counts


def count_delta(
    before: Mapping[tuple[str, str, str], float], after: Mapping[tuple[str, str, str], float]
) -> dict[tuple[str, str, str], float]:
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if after[key] - before.get(key, 0.0) > 0
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx of ``points`` (0 for fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
