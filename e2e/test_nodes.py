"""End-to-end checks of the harness itself: two libvirt nodes and the test guest.

These prove, without the operator, what the operator's e2e tests rely on: a TCG guest
boots from the image store, live migration between the nodes works with storage copy
(node-local pool) and without it (shared pool), the guest's uptime and disk counter keep
going across it, the guest can stop by itself and on ACPI shutdown, and ``down`` leaves
nothing behind. Timings are printed (run with ``-s``) because they size the timeouts
of the operator's tests.
"""

from __future__ import annotations

import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from harness import nodes as hn
from harness.guest import BOOT_MARKER, guest_cmdline, read_disk_counter

pytestmark = pytest.mark.e2e

UPTIME = re.compile(r"^VF-UPTIME (\d+\.\d+)", re.MULTILINE)
COUNTER = re.compile(r"^VF-COUNTER (\d+)", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[hn.Node]]]:
    state = tmp_path_factory.mktemp("nodes")
    # Ports of its own, so this self-test can run beside the suite's shared system.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIRTFLEET_NODE_PORT_BASE", "26610")
        t0 = time.monotonic()
        env = hn.up(state)
        print(f"\n[timing] up (cold state dir): {time.monotonic() - t0:.2f}s")
        yield state, hn.nodes_from_env(env)
        hn.down(state)


def _conn(node: hn.Node) -> libvirt.virConnect:
    return libvirt.open(node.uri)


def _domain_xml(node: hn.Node, name: str, cmdline: str, disk: tuple[str, str] | None) -> str:
    """A minimal TCG domain: direct kernel boot from the image store, serial to a file."""
    images = hn.POOL_PATHS[hn.IMAGES_POOL]
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "128"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = f"{images}/{hn.KERNEL_VOLUME}"
    ET.SubElement(os_, "initrd").text = f"{images}/{hn.INITRD_VOLUME}"
    ET.SubElement(os_, "cmdline").text = cmdline
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if disk is not None:
        pool, vol = disk
        d = ET.SubElement(devices, "disk", type="volume", device="disk")
        ET.SubElement(d, "driver", name="qemu", type="qcow2")
        ET.SubElement(d, "source", pool=pool, volume=vol)
        ET.SubElement(d, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=node.serial_log_path(name))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def _create_volume(node: hn.Node, pool: str, name: str, size_mib: int = 16) -> str:
    """Create (or recreate) an empty qcow2 volume; return its path in the node."""
    conn = _conn(node)
    try:
        p = conn.storagePoolLookupByName(pool)
        p.refresh(0)
        if name in p.listVolumes():
            p.storageVolLookupByName(name).delete(0)
        xml = (
            f"<volume><name>{name}</name><capacity unit='MiB'>{size_mib}</capacity>"
            "<target><format type='qcow2'/></target></volume>"
        )
        return str(p.createXML(xml, 0).path())
    finally:
        conn.close()


def _wait_state(node: hn.Node, name: str, state: int, timeout: float) -> float:
    """Wait for a domain state; return seconds waited."""
    t0 = time.monotonic()
    conn = _conn(node)
    try:
        while True:
            if conn.lookupByName(name).state()[0] == state:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(
                    f"{name} on {node.name} not in state {state} "
                    f"after {timeout}s:\n{hn.serial_log(node, name)[-1500:]}"
                )
            time.sleep(0.2)
    finally:
        conn.close()


def _has_domain(node: hn.Node, name: str) -> bool:
    conn = _conn(node)
    try:
        return name in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()


def _start(node: hn.Node, name: str, cmdline: str, disk: tuple[str, str] | None) -> float:
    """Define + start; return seconds from start() to the boot marker."""
    conn = _conn(node)
    try:
        dom = conn.defineXMLFlags(
            _domain_xml(node, name, cmdline, disk), libvirt.VIR_DOMAIN_DEFINE_VALIDATE
        )
        t0 = time.monotonic()
        dom.create()
    finally:
        conn.close()
    hn.wait_for_serial(node, name, re.escape(BOOT_MARKER), timeout=60)
    return time.monotonic() - t0


def _undefine(node: hn.Node, name: str) -> None:
    conn = _conn(node)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    finally:
        conn.close()


def _qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_live_migration_with_storage_copy(cluster: tuple[Path, list[hn.Node]]) -> None:
    _, (a, b) = cluster
    name = "vf-e2e-migrate"
    vol = f"{name}.qcow2"
    src_disk = Path(_create_volume(a, hn.LOCAL_POOL, vol))
    _create_volume(b, hn.LOCAL_POOL, vol)  # the target disk must exist for --copy-storage-all
    # Data only the source disk has: proof that the storage copy happened.
    assert _qemu_io(a.host_path(src_disk), "write -P 0x5a 1M 64k").returncode == 0

    boot = _start(a, name, guest_cmdline(counter=True), (hn.LOCAL_POOL, vol))
    print(f"\n[timing] guest start() -> {BOOT_MARKER}: {boot:.2f}s")
    hn.wait_for_serial(a, name, r"^VF-COUNTER 3$", timeout=30)

    t0 = time.monotonic()
    proc = subprocess.run(
        [
            "virsh",
            "-c",
            a.uri,
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            "--migrateuri",
            b.migrate_uri,
            "--copy-storage-all",
            name,
            b.uri,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    print(f"[timing] live migration with storage copy: {time.monotonic() - t0:.2f}s")
    assert proc.returncode == 0, proc.stderr

    assert not _has_domain(a, name), "source still has the domain after --undefinesource"
    hn.wait_for_serial(b, name, r"^VF-COUNTER \d+$", timeout=30)
    log_a, log_b = hn.serial_log(a, name), hn.serial_log(b, name)
    last_uptime_a = float(UPTIME.findall(log_a)[-1])
    first_uptime_b = float(UPTIME.findall(log_b)[0])
    assert last_uptime_a <= first_uptime_b < last_uptime_a + 30, (last_uptime_a, first_uptime_b)
    last_count_a = int(COUNTER.findall(log_a)[-1])
    first_count_b = int(COUNTER.findall(log_b)[0])
    assert last_count_a < first_count_b <= last_count_a + 3, (last_count_a, first_count_b)
    assert BOOT_MARKER not in log_b, "the guest rebooted on the target"

    conn = _conn(b)
    try:
        dom = conn.lookupByName(name)
        assert dom.isActive()
        assert dom.isPersistent()
        dom.destroy()
    finally:
        conn.close()
    dst_disk = b.pool_dir(hn.LOCAL_POOL) / vol
    assert _qemu_io(dst_disk, "read -P 0x5a 1M 64k").returncode == 0, "source data not copied"
    final = read_disk_counter(dst_disk)
    assert final is not None
    assert final >= first_count_b
    # Booting again on the target resumes the counter from its disk.
    conn = _conn(b)
    try:
        conn.lookupByName(name).create()
    finally:
        conn.close()
    m = hn.wait_for_serial(b, name, r"VF-COUNTER-BOOT (\d+)", timeout=60)
    assert int(m.group(1)) == final
    _undefine(b, name)


def test_live_migration_shared_pool(cluster: tuple[Path, list[hn.Node]]) -> None:
    """No storage copy: the disk is in the pool both nodes really share.

    libvirt calls this unsafe (the directory is not on a cluster/network filesystem it
    knows), so the migration needs VIR_MIGRATE_UNSAFE.
    """
    _, (a, b) = cluster
    name = "vf-e2e-shared"
    vol = f"{name}.qcow2"
    _create_volume(a, hn.SHARED_POOL, vol)
    _start(a, name, guest_cmdline(counter=True), (hn.SHARED_POOL, vol))
    hn.wait_for_serial(a, name, r"^VF-COUNTER 2$", timeout=30)
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        | libvirt.VIR_MIGRATE_UNSAFE
    )
    conn = _conn(a)
    try:
        b_conn = _conn(b)
        b_conn.storagePoolLookupByName(hn.SHARED_POOL).refresh(0)
        b_conn.close()
        t0 = time.monotonic()
        conn.lookupByName(name).migrateToURI3(
            b.uri, {libvirt.VIR_MIGRATE_PARAM_URI: b.migrate_uri}, flags
        )
        print(f"\n[timing] live migration, shared pool: {time.monotonic() - t0:.2f}s")
    finally:
        conn.close()
    assert not _has_domain(a, name)
    hn.wait_for_serial(b, name, r"^VF-COUNTER \d+$", timeout=30)
    last_a = int(COUNTER.findall(hn.serial_log(a, name))[-1])
    first_b = int(COUNTER.findall(hn.serial_log(b, name))[0])
    assert last_a < first_b <= last_a + 3
    _undefine(b, name)


def test_guest_powers_off_by_itself(cluster: tuple[Path, list[hn.Node]]) -> None:
    _, (_, b) = cluster
    name = "vf-e2e-poweroff"
    boot = _start(b, name, guest_cmdline(poweroff_after=3), None)
    waited = _wait_state(b, name, libvirt.VIR_DOMAIN_SHUTOFF, timeout=30)
    print(f"\n[timing] vf.poweroff=3: boot {boot:.2f}s, then shut off after {waited:.2f}s")
    assert "VF-POWEROFF vf.poweroff=3" in hn.serial_log(b, name)
    _undefine(b, name)


def test_acpi_shutdown(cluster: tuple[Path, list[hn.Node]]) -> None:
    _, (a, _) = cluster
    name = "vf-e2e-acpi"
    _start(a, name, guest_cmdline(), None)
    hn.wait_for_serial(a, name, r"^VF-UPTIME", timeout=30)
    conn = _conn(a)
    try:
        t0 = time.monotonic()
        conn.lookupByName(name).shutdown()
    finally:
        conn.close()
    _wait_state(a, name, libvirt.VIR_DOMAIN_SHUTOFF, timeout=30)
    print(f"\n[timing] virsh shutdown (ACPI) -> shut off: {time.monotonic() - t0:.2f}s")
    assert "VF-POWEROFF acpi-power-button" in hn.serial_log(a, name)
    _undefine(a, name)


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True
    ).stdout
    return [ln for ln in out.splitlines() if text in ln]


def test_down_leaves_nothing_and_up_again(cluster: tuple[Path, list[hn.Node]]) -> None:
    state, ns = cluster
    # A running guest must not survive down().
    _start(ns[0], "vf-e2e-leftover", guest_cmdline(), None)
    t0 = time.monotonic()
    hn.down(state)
    print(f"\n[timing] down with one running guest: {time.monotonic() - t0:.2f}s")
    for node in ns:
        assert hn.node_pids(node) == set(), f"{node.name} still has processes"
    assert _processes_mentioning(str(state)) == []
    assert _processes_mentioning("guest=vf-e2e-") == []  # no QEMU of ours
    mounts = subprocess.run(
        ["cat", *map(str, Path("/proc").glob("[0-9]*/mountinfo"))],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert str(state) not in mounts
    hn.down(state)  # idempotent

    t0 = time.monotonic()
    env = hn.up(state)
    print(f"[timing] up (warm state dir): {time.monotonic() - t0:.2f}s")
    t0 = time.monotonic()
    assert hn.up(state) == env  # idempotent: already up
    print(f"[timing] up (already up): {time.monotonic() - t0:.2f}s")
    for node in hn.nodes_from_env(env):
        conn = _conn(node)
        try:
            pools = {p.name(): p.isActive() for p in conn.listAllStoragePools(0)}
            assert pools == dict.fromkeys(hn.POOL_PATHS, 1)  # every pool, active
            images = conn.storagePoolLookupByName(hn.IMAGES_POOL).listVolumes()
            assert {
                hn.KERNEL_VOLUME,
                hn.INITRD_VOLUME,
                hn.BASE_IMAGE_VOLUME,
                hn.BASE_IMAGE_COUNTER_VOLUME,
            } <= set(images)
            # The leftover guest was persistent: it is defined but not running.
            assert conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == []
        finally:
            conn.close()
