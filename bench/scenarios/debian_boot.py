"""Boot of the real Debian guest (``harness.debian``): virtfleet vs raw libvirt, same image.

virtfleet: apply a VirtualMachine (the Debian disk from the image store, its own kernel,
a cloud-init seed) → ``login:`` on its serial console. Raw: the very domain XML virtfleet
made, renamed, on a fresh copy-on-write overlay of the same image and a copy of the same
seed, ``defineXML`` + ``create`` with libvirt-python → ``login:``. Interleaved, so a noisy
moment hits both sides alike. The guest boots under TCG: seconds of firmware, kernel,
systemd and cloud-init, of which virtfleet's share is the reconcile and the volume work.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from bench import guests
from bench.result import BenchContext, Row, ScenarioResult
from harness import nodes as hn
from harness.debian import DEBIAN_DISK_VOLUME, debian_vm, ensure_debian, place

NODE = "node-a"
LOGIN = re.compile(r"^\S+ login:", re.MULTILINE)
BOOT_TIMEOUT_S = 600.0
USER_DATA = "#cloud-config\nruncmd:\n  - echo booted > /dev/ttyS0\n"


def wait_login(log: Path, since: float) -> float:
    """Seconds from ``since`` until the serial log shows a login prompt."""
    deadline = since + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.exists() and LOGIN.search(log.read_text(errors="replace")):
            return time.monotonic() - since
        time.sleep(0.2)
    raise guests.BenchError(f"no login prompt in {log} within {BOOT_TIMEOUT_S:.0f}s")


def boot_virtfleet(ctx: BenchContext, namespace: str, name: str) -> tuple[float, str]:
    """creation → login; the domain XML virtfleet defined (its seed copied for the twin)."""
    node = guests.node(ctx.env, NODE)
    api = guests.api_client(ctx.env)
    domain = f"{namespace}_{name}"
    log = node.serial_dir_host / f"{domain}.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    vm = debian_vm(
        name,
        namespace,
        nodeName=NODE,
        cloudInit={"userData": USER_DATA},
        terminationGracePeriodSeconds=5,
    )
    guests.create_vm(api, vm)
    seconds = wait_login(log, started)
    conn = libvirt.open(node.uri)
    try:
        xml: str = conn.lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    return seconds, xml


def twin_of(node: hn.Node, xml: str, name: str) -> str:
    """virtfleet's domain under ``name`` on its own overlay of the image and its own copy
    of the seed (made now, while virtfleet's VM still has its files)."""
    root = ET.fromstring(xml)
    local = node.pool_dir(hn.LOCAL_POOL)
    image_in_node = f"{hn.POOL_PATHS[hn.IMAGES_POOL]}/{DEBIAN_DISK_VOLUME}"
    for disk in root.iter("disk"):
        source = disk.find("source")
        if source is None or not source.get("file"):
            continue
        old = Path(str(source.get("file")))
        new_name = f"{name}-{'seed.iso' if old.suffix == '.iso' else 'root.qcow2'}"
        if old.suffix == ".iso":
            shutil.copyfile(node.host_path(str(old)), local / new_name)
        else:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2",
                 "-b", image_in_node, str(local / new_name), "3G"],
                check=True,
            )  # fmt: skip
            backing = disk.find("backingStore")
            if backing is not None:
                disk.remove(backing)
        source.set("file", f"{hn.POOL_PATHS[hn.LOCAL_POOL]}/{new_name}")
    return guests.raw_twin_xml(ET.tostring(root, encoding="unicode"), name)


def boot_raw(ctx: BenchContext, twin: str, name: str) -> float:
    node = guests.node(ctx.env, NODE)
    log = node.serial_dir_host / f"{name}.log"
    log.unlink(missing_ok=True)
    conn = libvirt.open(node.uri)
    try:
        started = time.monotonic()
        conn.defineXML(twin).create()
        return wait_login(log, started)
    finally:
        guests.raw_remove(conn, [name])
        conn.close()
        for leftover in node.pool_dir(hn.LOCAL_POOL).glob(f"{name}-*"):
            leftover.unlink()


def run(ctx: BenchContext) -> ScenarioResult:
    repeats = 1 if ctx.small else 3
    image = ensure_debian()
    node = guests.node(ctx.env, NODE)
    place(image, node.pool_dir(hn.IMAGES_POOL))
    subprocess.run(["virsh", "-q", "-c", node.uri, "pool-refresh", hn.IMAGES_POOL], check=True)
    namespace = guests.unique("bench-debian")
    api = guests.api_client(ctx.env)
    guests.ensure_namespace(api, namespace)
    vf: list[float] = []
    raw: list[float] = []
    for i in range(repeats):
        name = f"deb{i}"
        seconds, xml = boot_virtfleet(ctx, namespace, name)
        vf.append(seconds)
        twin = twin_of(node, xml, f"{namespace}-raw{i}")
        guests.delete_vms(ctx.env, namespace, [name], NODE)
        raw.append(boot_raw(ctx, twin, f"{namespace}-raw{i}"))
    guests.delete_namespace(api, namespace)
    vf_median, raw_median = statistics.median(vf), statistics.median(raw)
    return ScenarioResult(
        name="debian_boot",
        title="Boot of a real Debian guest (systemd, cloud-init) to its login prompt",
        rows=[
            Row(
                metric=f"apply → login prompt (median of {repeats})",
                virtfleet=vf_median,
                raw=raw_median,
                unit="s",
                target="≤ 1.1× raw",
                ok=vf_median <= 1.1 * raw_median,
            )
        ],
        samples={"virtfleet": vf, "raw libvirt-python": raw},
        notes=[
            f"Debian {image.key}, 1 GiB, TCG on {NODE}; raw = the same domain XML renamed, "
            "on its own overlay of the same image and a copy of the same seed.",
            f"samples (s): virtfleet {[round(v, 1) for v in vf]}, raw {[round(v, 1) for v in raw]}",
        ],
    )
