"""``disks[].source.http`` on a real node: downloaded, verified, booted; a bad checksum refused.

A loopback HTTP server in this process serves the harness's counter image (a qcow2 whose
first record is ``VFCOUNTER 1000``); the agent downloads it, checks its SHA-256 and format,
stores it in the node's pool and boots a guest from it. The guest printing
``VF-COUNTER-BOOT 1000`` proves the downloaded bytes are what the disk holds. The
harness's agents allow 127.0.0.0/8 explicitly (``--http-allow-cidr``); loopback is
otherwise denied, as ``[::1]`` still is.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator

import pytest

from harness import nodes as hn
from harness import underlay
from harness.guest import guest_cmdline
from harness.testing import Cluster, condition, domain_name, vm_manifest, wait_for
from testkit.httpserve import serve_folder

IMAGE = "base-counter-1000.qcow2"


@pytest.fixture(scope="module")
def image_server(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """``(url, sha256)`` of the counter image, served on the machine's underlay address
    (the agents run in their nodes' network namespaces)."""
    folder = cluster.state_dir / "base-images"
    path = folder / IMAGE
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    with serve_folder(folder, underlay.host_address(cluster.state_dir)) as base:
        yield f"{base}/{IMAGE}", sha


def http_vm(name: str, namespace: str, url: str, sha: str) -> dict[str, object]:
    return vm_manifest(
        name,
        namespace,
        nodeName="node-a",
        cmdline=guest_cmdline(counter=True),
        disks=[{"name": "root", "source": {"http": {"url": url, "sha256": sha}}}],
    )


def test_http_disk_boots_with_the_downloaded_content(
    system: Cluster, namespace: str, image_server: tuple[str, str]
) -> None:
    url, sha = image_server
    system.apply(http_vm("fetched", namespace, url, sha))

    def running() -> bool:
        return bool(
            system.get("vm", "fetched", namespace).get("status", {}).get("printableStatus")
            == "Running"
        )

    wait_for(running, 180, 1.0, "the VM with an http disk Running")
    node = system.node("node-a")
    match = hn.wait_for_serial(
        node, domain_name(namespace, "fetched"), r"VF-COUNTER-BOOT (\d+)", timeout=120
    )
    assert int(match.group(1)) == 1000


def test_wrong_checksum_is_reported_and_nothing_is_defined(
    system: Cluster, namespace: str, image_server: tuple[str, str]
) -> None:
    url, _ = image_server
    system.apply(http_vm("tampered", namespace, url, "0" * 64))

    def stalled() -> dict[str, object] | None:
        vm = system.get("vm", "tampered", namespace)
        cond = condition(vm, "Stalled")
        return cond if cond and cond.get("reason") == "ChecksumMismatch" else None

    cond = wait_for(stalled, 120, 1.0, "Stalled/ChecksumMismatch")
    assert "sha256" in str(cond["message"])
    ready = condition(system.get("vm", "tampered", namespace), "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    events = system.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=tampered",
        "-o", "jsonpath={.items[*].reason}",
    ).stdout  # fmt: skip
    assert "ChecksumMismatch" in events
    # Nothing of it on the node: no volume (not even a partial download), no domain.
    node = system.node("node-a")
    uid = system.get("vm", "tampered", namespace)["metadata"]["uid"]
    assert uid not in virsh(node, "vol-list", hn.LOCAL_POOL)
    assert domain_name(namespace, "tampered") not in virsh(node, "list", "--all", "--name")


def test_a_denied_loopback_address_is_refused(
    system: Cluster, namespace: str, image_server: tuple[str, str]
) -> None:
    """The default deny-list holds: the harness's agents allow only 127.0.0.0/8, so the
    same server's IPv6 loopback address is refused before any connection is made."""
    url, sha = image_server
    port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    system.apply(http_vm("denied", namespace, f"http://[::1]:{port}/{IMAGE}", sha))

    def stalled() -> dict[str, object] | None:
        cond = condition(system.get("vm", "denied", namespace), "Stalled")
        return cond if cond and cond.get("reason") == "DestinationDenied" else None

    cond = wait_for(stalled, 120, 1.0, "Stalled/DestinationDenied")
    assert "may not download from" in str(cond["message"])
    events = system.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=denied",
        "-o", "jsonpath={.items[*].reason}",
    ).stdout  # fmt: skip
    assert "DestinationDenied" in events
    node = system.node("node-a")
    assert domain_name(namespace, "denied") not in virsh(node, "list", "--all", "--name")


def virsh(node: hn.Node, *args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", node.uri, *args],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
