"""What the real-guest scenarios share: small VMs through virtfleet, their raw libvirt twins,
a watch that timestamps ``Running``, and clean-up that waits until the domains are gone.

Times are ``time.monotonic()`` in this process, taken as close to the event as the client
sees it: just before the create call, and when the watch event arrives.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import libvirt
from kubernetes import client, config, watch

from bench import report
from bench.result import Row
from harness import nodes as hn
from harness.testing import poll

GROUP, VERSION = "virtfleet.io", "v1alpha1"
VMS = "virtualmachines"
#: The VMs of the start scenarios: no kernel and no disk, so QEMU starts, SeaBIOS finds
#: nothing to boot and the domain stays running. It costs QEMU start-up and nothing else.
SMALL_MEMORY = "64Mi"


class BenchError(RuntimeError):
    """A scenario could not measure what it set out to measure."""


def wait(predicate: Callable[[], Any], timeout: float, interval: float, what: str) -> Any:
    """Poll until ``predicate`` returns something truthy; BenchError after ``timeout``."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
    return value


def api_client(env: Mapping[str, str]) -> client.ApiClient:
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])  # type: ignore[no-untyped-call]
    return cast(client.ApiClient, api)


def node(env: Mapping[str, str], name: str = "node-a") -> hn.Node:
    return next(n for n in hn.nodes_from_env(dict(env)) if n.name == name)


def ensure_namespace(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )


def small_vm(name: str, namespace: str, node_name: str, **spec: Any) -> dict[str, Any]:
    """A 64 MiB VM without kernel or disks, pinned to ``node_name``."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node_name,
            "memory": {"size": SMALL_MEMORY},
            "terminationGracePeriodSeconds": 0,
            **spec,
        },
    }


def create_vm(api: client.ApiClient, body: dict[str, Any]) -> float:
    """Create the VM; returns the monotonic time just before the request."""
    started = time.monotonic()
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, body["metadata"]["namespace"], VMS, body
    )
    return started


def printable_status(api: client.ApiClient, namespace: str, name: str) -> str | None:
    obj = cast(
        dict[str, Any],
        client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, VMS, name
        ),
    )
    status: str | None = (obj.get("status") or {}).get("printableStatus")
    return status


class RunningWatch:
    """Watches the VMs of one namespace and records when each is first seen ``Running``."""

    def __init__(self, env: Mapping[str, str], namespace: str) -> None:
        self._api = api_client(env)
        self._namespace = namespace
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.running_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._loop, name="running-watch", daemon=True)

    def __enter__(self) -> RunningWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def seen(self, name: str) -> float | None:
        with self._lock:
            return self.running_at.get(name)

    def wait_all(self, names: Iterable[str], timeout: float) -> dict[str, float]:
        """Running times of ``names`` (those that made it within ``timeout``)."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if wanted <= self.running_at.keys():
                    break
            time.sleep(0.05)
        with self._lock:
            return {n: t for n, t in self.running_at.items() if n in wanted}

    def _loop(self) -> None:
        objects = client.CustomObjectsApi(self._api)
        resource_version = ""
        while not self._stop.is_set():
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self._namespace,
                    VMS,
                    resource_version=resource_version or None,
                    timeout_seconds=5,
                    allow_watch_bookmarks=False,
                ):
                    now = time.monotonic()
                    obj = event["object"]
                    resource_version = obj["metadata"].get("resourceVersion", resource_version)
                    name = obj["metadata"]["name"]
                    if (obj.get("status") or {}).get("printableStatus") == "Running":
                        with self._lock:
                            self.running_at.setdefault(name, now)
                    if self._stop.is_set():
                        stream.stop()  # type: ignore[no-untyped-call]
            except client.ApiException as err:
                if err.status == 410:  # expired: list again
                    resource_version = ""
                else:
                    time.sleep(0.2)


def domain_names(conn: libvirt.virConnect) -> set[str]:
    return {d.name() for d in conn.listAllDomains()}


def delete_vms(
    env: Mapping[str, str], namespace: str, names: Iterable[str], node_name: str = "node-a"
) -> None:
    """Delete the VMs and wait until the objects and their domains are gone."""
    api = api_client(env)
    objects = client.CustomObjectsApi(api)
    names = list(names)
    for name in names:
        with contextlib.suppress(client.ApiException):
            objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, VMS, name)
    conn = libvirt.open(node(env, node_name).uri)
    try:
        domains = {f"{namespace}_{n}" for n in names}
        wait(lambda: not domains & domain_names(conn), 300, 0.5, f"{len(domains)} domains gone")
    finally:
        conn.close()

    def objects_gone() -> bool:
        listed = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, VMS)
        items = cast(dict[str, Any], listed)["items"]
        return not {i["metadata"]["name"] for i in items} & set(names)

    wait(objects_gone, 120, 0.5, "VM objects gone")


def raw_twin_xml(xml: str, name: str) -> str:
    """The same domain as virtfleet defined it, under another name: no uuid (libvirt makes
    one), no virtfleet metadata (so no agent ever touches it), its own serial log."""
    root = ET.fromstring(xml)
    old = root.findtext("name") or ""
    root.find("name").text = name  # type: ignore[union-attr]
    for tag in ("uuid", "metadata"):
        element = root.find(tag)
        if element is not None:
            root.remove(element)
    for element, attribute in [
        *((source, "path") for source in root.iter("source")),
        *((log, "file") for log in root.iter("log")),  # the pty serial port's log
    ]:
        path = element.get(attribute)
        if path and old in path:
            element.set(attribute, path.replace(old, name))
    return ET.tostring(root, encoding="unicode")


def raw_start(conn: libvirt.virConnect, xml: str) -> float:
    """Define and start one domain the way a script would; returns the seconds it took."""
    started = time.monotonic()
    conn.defineXML(xml).create()
    return time.monotonic() - started


def raw_remove(conn: libvirt.virConnect, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefine()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


def latency_rows(
    what: str, virtfleet: list[float], raw: list[float], max_ratio: float
) -> list[Row]:
    """p50/p95/max rows of a virtfleet-vs-raw latency distribution, judged as ratios."""
    rows = []
    for label, q in (("p50", 50.0), ("p95", 95.0), ("max", 100.0)):
        vf = report.percentile(virtfleet, q) if virtfleet else None
        rw = report.percentile(raw, q) if raw else None
        judged = label != "max" and vf is not None and rw is not None
        rows.append(
            Row(
                metric=f"{what} {label}",
                virtfleet=vf,
                raw=rw,
                unit="s",
                target=f"≤ {max_ratio:g}× raw" if label != "max" else "",
                ok=(vf <= max_ratio * rw) if judged else None,  # type: ignore[operator]
            )
        )
    return rows


def delete_namespace(api: client.ApiClient, name: str) -> None:
    """Delete a scenario's namespace without waiting (its VMs are already gone)."""
    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(api).delete_namespace(name)
