"""VMMigration on the real system: a live migration proved from the guest's own console.

The guest prints ``VF-UPTIME`` every second: after a live migration the uptime keeps
counting in the *target's* serial log and the boot marker never appears a second time.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from typing import Any

from harness import nodes as hn
from harness.guest import BOOT_MARKER
from harness.testing import Cluster, condition, domain_name, virsh, vm_manifest, wait_for
from harness.testing import migration_manifest as migration

UPTIME = re.compile(r"^VF-UPTIME (\d+(?:\.\d+)?)\s*$", re.MULTILINE)
DATA_DISK = [{"name": "data", "size": "16Mi", "source": {"blank": {}}}]
NODE_LABEL = "virtfleet.io/node"


def has_domain(node: hn.Node, dom: str) -> bool:
    return dom in virsh(node, "list", "--all", "--name").split()


def uptimes(node: hn.Node, dom: str) -> list[float]:
    try:
        return [float(m.group(1)) for m in UPTIME.finditer(hn.serial_log(node, dom))]
    except FileNotFoundError:
        return []


def wait_phase(
    cluster: Cluster, ns: str, name: str, phases: tuple[str, ...], timeout: float = 120
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = cluster.get("vmmig", name, ns)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    result: dict[str, Any] = wait_for(check, timeout, 0.1, f"vmmig {ns}/{name} in {phases}")
    return result


def running_vm(system: Cluster, ns: str, name: str, **spec: Any) -> tuple[hn.Node, hn.Node]:
    """Start a VM wherever the controller puts it; returns (its node, the other node)."""
    system.apply(vm_manifest(name, ns, **spec))
    vm = wait_for(
        lambda: (
            obj
            if (obj := system.get("vm", name, ns)).get("status", {}).get("printableStatus")
            == "Running"
            else None
        ),
        90,
        0.2,
        f"vm {name} Running",
    )
    here = system.node(vm["status"]["nodeName"])
    other = next(n for n in system.nodes if n.name != here.name)
    hn.wait_for_serial(here, domain_name(ns, name), BOOT_MARKER, timeout=60)
    return here, other


def test_live_migration_keeps_the_guest_running(system: Cluster, namespace: str) -> None:
    src, dst = running_vm(system, namespace, "mover", disks=DATA_DISK)
    dom = domain_name(namespace, "mover")
    wait_for(lambda: max(uptimes(src, dom), default=0) >= 4, 60, what="uptime 4 s")

    started = time.monotonic()
    system.apply(migration("move-1", namespace, "mover", targetNode=dst.name))
    mig = wait_phase(system, namespace, "move-1", ("Succeeded", "Failed"))
    t_operator = time.monotonic() - started
    status = mig["status"]
    assert status["phase"] == "Succeeded", status
    assert status["sourceNode"] == src.name
    assert status["targetNode"] == dst.name
    assert status["progress"]["percent"] == 100
    assert condition(mig, "Ready")["status"] == "True"  # type: ignore[index]

    last_on_source = max(uptimes(src, dom))
    wait_for(
        lambda: max(uptimes(dst, dom), default=0) >= last_on_source + 3,
        30,
        what="uptime counting on the target",
    )
    resumed = [u for u in uptimes(dst, dom) if u > 0]
    assert resumed[0] >= last_on_source - 2, (last_on_source, resumed[:3])
    assert BOOT_MARKER not in hn.serial_log(dst, dom) or hn.serial_log(dst, dom).count(
        BOOT_MARKER
    ) == hn.serial_log(src, dom).count(BOOT_MARKER)
    assert not has_domain(src, dom), "the source still has the domain"
    assert has_domain(dst, dom)

    def handed_over() -> dict[str, Any] | None:
        vm = system.get("vm", "mover", namespace)
        ok = (
            vm["status"].get("nodeName") == dst.name
            and vm["metadata"]["labels"].get(NODE_LABEL) == dst.name
            and vm["status"].get("printableStatus") == "Running"
            and f"virtfleet.io/agent-{dst.name}" in vm["metadata"].get("finalizers", [])
        )
        return vm if ok else None

    vm = wait_for(handed_over, 30, 0.2, "VM handed over to the target")
    assert f"virtfleet.io/agent-{src.name}" not in vm["metadata"]["finalizers"]
    # The target's VM loop adopted the running domain: no restart (uptime kept counting).
    time.sleep(3)
    assert hn.serial_log(dst, dom).count(BOOT_MARKER) <= 1
    values = uptimes(dst, dom)
    assert all(b >= a for a, b in itertools.pairwise(values)), "the guest restarted"
    table = system.kubectl("get", "vmmig", "move-1", "-n", namespace).stdout
    assert "Succeeded" in table, table
    print(f"\n[migration] {table}")

    t_raw = raw_virsh_migration_seconds(src, dst, f"vf-raw-{namespace[-5:]}")
    print(
        f"[timing] live migration with storage copy (128Mi guest, 16Mi local disk): operator "
        f"{t_operator:.2f}s (apply → Succeeded), downtime {status.get('downtimeMs')} ms; "
        f"raw virsh migrate of a comparable foreign guest {t_raw:.2f}s"
    )


def raw_virsh_migration_seconds(src: hn.Node, dst: hn.Node, name: str) -> float:
    """Seconds of a bare ``virsh migrate --live --p2p ... --copy-storage-all`` of a foreign
    guest like the operator's (128 MiB, same kernel/initrd, blank 16 MiB qcow2 disk in
    the node-local pool, the target volume pre-created): the baseline for the operator's
    time. Everything it makes is removed again on both nodes."""
    from harness.guest import guest_cmdline

    volume = f"{name}.qcow2"
    images, local = hn.POOL_PATHS[hn.IMAGES_POOL], hn.POOL_PATHS[hn.LOCAL_POOL]
    xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{images}/{hn.KERNEL_VOLUME}</kernel>
    <initrd>{images}/{hn.INITRD_VOLUME}</initrd>
    <cmdline>{guest_cmdline()}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{local}/{volume}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{src.serial_log_path(name)}'/><target port='0'/></serial>
  </devices>
</domain>"""
    try:
        for node in (src, dst):
            virsh(node, "vol-create-as", hn.LOCAL_POOL, volume, "16M", "--format", "qcow2")
        subprocess.run(
            ["virsh", "-c", src.uri, "define", "/dev/stdin"],
            input=xml,
            text=True,
            check=True,
            capture_output=True,
        )
        virsh(src, "start", name)
        hn.wait_for_serial(src, name, BOOT_MARKER, timeout=60)
        wait_for(lambda: max(uptimes(src, name), default=0) >= 4, 60, what="raw guest uptime 4 s")
        started = time.monotonic()
        virsh(
            src,
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            "--copy-storage-all",
            "--migrateuri",
            dst.migrate_uri,
            name,
            dst.uri,
        )
        elapsed = time.monotonic() - started
        assert has_domain(dst, name), "raw virsh migrate left no domain on the target"
        return elapsed
    finally:
        for node in (src, dst):
            virsh(node, "destroy", name, check=False)
            virsh(node, "undefine", name, check=False)
            virsh(node, "vol-delete", volume, "--pool", hn.LOCAL_POOL, check=False)


def test_refusals(system: Cluster, namespace: str) -> None:
    src, dst = running_vm(
        system, namespace, "stay", nodeSelector={}, disks=DATA_DISK
    )  # placed anywhere
    cases = {
        "to-nowhere": ({"targetNode": "no-such-node"}, "no such Node"),
        "to-itself": ({"targetNode": src.name}, "already runs on"),
    }
    for name, (spec, text) in cases.items():
        system.apply(migration(name, namespace, "stay", **spec))
        mig = wait_phase(system, namespace, name, ("Failed", "Succeeded"), timeout=30)
        assert mig["status"]["phase"] == "Failed", mig["status"]
        assert text in mig["status"]["failureReason"], mig["status"]
        assert condition(mig, "Stalled")["status"] == "True"  # type: ignore[index]

    # A VM whose nodeSelector only matches its own node cannot go anywhere else.
    system.apply(
        vm_manifest(
            "picky",
            namespace,
            nodeSelector={"kubernetes.io/hostname": src.name},
        )
    )
    wait_for(
        lambda: (
            system.get("vm", "picky", namespace).get("status", {}).get("printableStatus")
            == "Running"
        ),
        90,
        0.2,
        "picky Running",
    )
    system.apply(migration("picky-move", namespace, "picky", targetNode=dst.name))
    mig = wait_phase(system, namespace, "picky-move", ("Failed", "Succeeded"), timeout=30)
    assert mig["status"]["phase"] == "Failed"
    assert "does not match nodeSelector" in mig["status"]["failureReason"], mig["status"]


def test_target_without_capacity_is_refused(system: Cluster, namespace: str) -> None:
    src, dst = running_vm(system, namespace, "small")
    # A halted VM still reserves its memory on its node: fill the target with one, once
    # VMs of earlier tests (namespaces being deleted) have left it.
    wait_for(
        lambda: system.get("vmhost", dst.name)["status"].get("allocatedMemoryBytes") == 0,
        120, 0.5, f"{dst.name} to hold no VM",
    )  # fmt: skip
    host = system.get("vmhost", dst.name)
    filler = max(host["status"]["memoryBytes"] // 2**20 - 64, 128)
    system.apply(
        vm_manifest(
            "filler", namespace, nodeName=dst.name, runStrategy="Halted",
            memory={"size": f"{filler}Mi"},
        )
    )  # fmt: skip
    wait_for(
        lambda: (system.get("vm", "filler", namespace).get("status") or {}).get("nodeName"),
        60, 0.2, "the filler placed",
    )  # fmt: skip
    system.apply(migration("too-full", namespace, "small", targetNode=dst.name))
    mig = wait_phase(system, namespace, "too-full", ("Failed", "Succeeded"), timeout=30)
    assert mig["status"]["phase"] == "Failed", mig["status"]
    assert "free" in mig["status"]["failureReason"], mig["status"]
    assert has_domain(src, domain_name(namespace, "small"))
    # Give the room back before the next test schedules migrations to that node.
    system.kubectl("delete", "vm", "filler", "-n", namespace, "--timeout=90s")
    wait_for(
        lambda: system.get("vmhost", dst.name)["status"].get("allocatedMemoryBytes", 0)
        < 2**30,
        60, 0.5, f"{dst.name} to be free again",
    )  # fmt: skip


def test_progress_concurrent_refusal_and_cancel(system: Cluster, namespace: str) -> None:
    src, dst = running_vm(system, namespace, "slow", disks=DATA_DISK)
    dom = domain_name(namespace, "slow")
    system.apply(
        migration("slow-1", namespace, "slow", targetNode=dst.name, policy={"bandwidthMiBps": 1})
    )
    wait_phase(system, namespace, "slow-1", ("Running",), timeout=30)
    system.apply(migration("slow-2", namespace, "slow", targetNode=dst.name))
    second = wait_phase(system, namespace, "slow-2", ("Failed", "Scheduled", "Running"), 30)
    assert second["status"]["phase"] == "Failed", second["status"]
    assert "another migration" in second["status"]["failureReason"]
    vm = system.get("vm", "slow", namespace)
    assert vm["status"]["printableStatus"] == "Migrating", vm["status"]

    seen: list[tuple[int, int]] = []

    def progressed() -> bool:
        prog = (system.get("vmmig", "slow-1", namespace).get("status") or {}).get("progress")
        if prog and prog.get("dataProcessedBytes") is not None:
            sample = (int(prog.get("percent") or 0), int(prog["dataProcessedBytes"]))
            if not seen or seen[-1] != sample:
                seen.append(sample)
        return len(seen) >= 2

    wait_for(progressed, 30, 0.3, "two progress updates")
    print(f"\n[migration] progress samples: {seen}")
    before = max(uptimes(src, dom))
    system.kubectl("delete", "vmmig", "slow-1", "-n", namespace, "--wait=true", "--timeout=60s")
    assert has_domain(src, dom)
    wait_for(
        lambda: max(uptimes(src, dom), default=0) >= before + 3, 30, what="still running on source"
    )
    assert not has_domain(dst, dom) or "running" not in virsh(dst, "domstate", dom, check=False)
    wait_for(
        lambda: system.get("vm", "slow", namespace)["status"].get("printableStatus") == "Running",
        30,
        0.2,
        "VM Running again on the source",
    )
    vm = system.get("vm", "slow", namespace)
    assert vm["status"]["nodeName"] == src.name


def test_completion_timeout_aborts_and_the_vm_stays(system: Cluster, namespace: str) -> None:
    src, dst = running_vm(system, namespace, "hasty", disks=DATA_DISK)
    dom = domain_name(namespace, "hasty")
    policy = {"bandwidthMiBps": 1, "completionTimeoutPerGiB": 1}
    system.apply(migration("hasty-1", namespace, "hasty", targetNode=dst.name, policy=policy))
    mig = wait_phase(system, namespace, "hasty-1", ("Succeeded", "Failed"), timeout=120)
    assert mig["status"]["phase"] == "Failed", mig["status"]
    assert "completion timeout" in mig["status"]["failureReason"], mig["status"]
    before = max(uptimes(src, dom), default=0)
    wait_for(
        lambda: max(uptimes(src, dom), default=0) >= before + 2, 60, what="still running on source"
    )
    wait_for(
        lambda: (
            (st := system.get("vm", "hasty", namespace)["status"]).get("printableStatus")
            == "Running"
            and st.get("nodeName") == src.name
        ),
        60,
        0.3,
        "VM Running on the source",
    )
    assert not has_domain(dst, dom) or "running" not in virsh(dst, "domstate", dom, check=False)
    print(f"\n[migration] completion timeout: {mig['status']['failureReason']}")


def running_domains(system: Cluster, dom: str) -> list[str]:
    return [n.name for n in system.nodes if dom in virsh(n, "list", "--name").split()]


def test_source_agent_killed_mid_migration(system: Cluster, namespace: str) -> None:
    import signal

    from harness import operators

    src, dst = running_vm(system, namespace, "crashy", disks=DATA_DISK)
    dom = domain_name(namespace, "crashy")
    policy = {"bandwidthMiBps": 4}
    system.apply(migration("crashy-1", namespace, "crashy", targetNode=dst.name, policy=policy))
    wait_phase(system, namespace, "crashy-1", ("Running",), timeout=60)
    time.sleep(3)
    agent = f"agent-{src.name}"
    operators.kill(system.state_dir, agent, signal.SIGKILL)
    try:
        time.sleep(2)
    finally:
        operators.start_agent(system.state_dir, system.env, src)
    mig = wait_phase(system, namespace, "crashy-1", ("Succeeded", "Failed"), timeout=180)

    def settled() -> str | None:
        st = system.get("vm", "crashy", namespace).get("status") or {}
        where = running_domains(system, dom)
        one = len(where) == 1 and where[0] == st.get("nodeName")
        return where[0] if one and st.get("printableStatus") == "Running" else None

    node = wait_for(settled, 120, 0.5, "exactly one running domain, where status says")
    time.sleep(5)
    assert running_domains(system, dom) == [node]
    print(f"\n[migration] agent killed mid-migration: {mig['status']['phase']}, VM on {node}")


def migrate_and_check_counter(
    system: Cluster, namespace: str, name: str, src: hn.Node, dst: hn.Node
) -> None:
    """Migrate a counting guest and prove it kept counting on the target without a reboot."""
    dom = domain_name(namespace, name)
    hn.wait_for_serial(src, dom, r"^VF-COUNTER 3\s*$", timeout=60)
    system.apply(migration(f"{name}-1", namespace, name, targetNode=dst.name))
    mig = wait_phase(system, namespace, f"{name}-1", ("Succeeded", "Failed"), timeout=120)
    assert mig["status"]["phase"] == "Succeeded", mig["status"]
    counter = re.compile(r"^VF-COUNTER (\d+)\s*$", re.MULTILINE)

    def counts(node: hn.Node) -> list[int]:
        return [int(m.group(1)) for m in counter.finditer(hn.serial_log(node, dom))]

    last_on_source = max(counts(src))
    wait_for(lambda: len(counts(dst)) >= 3, 60, what="three counts on the target")
    after = counts(dst)
    assert last_on_source - 1 <= after[0] <= last_on_source + 3, (last_on_source, after[:3])
    assert all(b == a + 1 for a, b in itertools.pairwise(after)), after
    assert "VF-COUNTER-BOOT" not in hn.serial_log(dst, dom)
    print(f"\n[migration] counter: {last_on_source} on {src.name}, then {after[:3]} on {dst.name}")


def test_counter_disk_continues_on_the_target(system: Cluster, namespace: str) -> None:
    from harness.guest import guest_cmdline

    src, dst = running_vm(
        system, namespace, "tally", disks=DATA_DISK, cmdline=guest_cmdline(counter=True)
    )
    migrate_and_check_counter(system, namespace, "tally", src, dst)


SHARED_DISK = [{"name": "data", "size": "16Mi", "source": {"blank": {}}, "pool": hn.SHARED_POOL}]


def test_shared_pool_disk_migrates_without_a_copy(system: Cluster, namespace: str) -> None:
    from harness.guest import guest_cmdline

    src, dst = running_vm(
        system, namespace, "sharer", disks=SHARED_DISK, cmdline=guest_cmdline(counter=True)
    )
    dom = domain_name(namespace, "sharer")
    vm = system.get("vm", "sharer", namespace)
    volume = f"{vm['metadata']['uid']}-data"
    assert volume in virsh(src, "vol-list", hn.SHARED_POOL), "disk not in the shared pool"
    migrate_and_check_counter(system, namespace, "sharer", src, dst)
    # No storage copy: nothing was created in the target's node-local pool, and the
    # source agent's clean-up left the shared volume alone (the target runs on it).
    assert volume not in virsh(dst, "vol-list", hn.LOCAL_POOL)
    for node in (src, dst):
        virsh(node, "pool-refresh", hn.SHARED_POOL)
        assert volume in virsh(node, "vol-list", hn.SHARED_POOL), f"volume gone on {node.name}"
    disk_xml = virsh(dst, "dumpxml", dom)
    assert f"{hn.POOL_PATHS[hn.SHARED_POOL]}/{volume}" in disk_xml, disk_xml
    wait_for(
        lambda: system.get("vm", "sharer", namespace)["status"].get("nodeName") == dst.name,
        30,
        0.2,
        "VM handed over",
    )
    print(f"[migration] shared pool: volume {volume} kept, no copy on {dst.name}")


def test_offline_migration_copies_the_disk_and_boots_on_the_target(
    system: Cluster, namespace: str
) -> None:
    from harness.guest import guest_cmdline

    src, dst = running_vm(
        system, namespace, "parcel", disks=DATA_DISK, cmdline=guest_cmdline(counter=True)
    )
    dom = domain_name(namespace, "parcel")
    hn.wait_for_serial(src, dom, r"^VF-COUNTER 3\s*$", timeout=60)
    started = time.monotonic()
    system.apply(migration("parcel-1", namespace, "parcel", targetNode=dst.name, mode="Offline"))
    mig = wait_phase(system, namespace, "parcel-1", ("Succeeded", "Failed"), timeout=180)
    t_offline = time.monotonic() - started
    assert mig["status"]["phase"] == "Succeeded", mig["status"]
    counter = re.compile(r"^VF-COUNTER (\d+)\s*$", re.MULTILINE)
    boot = re.compile(r"^VF-COUNTER-BOOT (\d+)\s*$", re.MULTILINE)
    source_log = hn.serial_log(src, dom)
    assert "VF-POWEROFF acpi-power-button" in source_log, "no graceful stop on the source"
    last_on_source = max(int(m.group(1)) for m in counter.finditer(source_log))
    assert not has_domain(src, dom), "the source still has the domain"

    def booted() -> list[int] | None:
        found = [int(m.group(1)) for m in boot.finditer(hn.serial_log(dst, dom))]
        return found or None

    boots = wait_for(booted, 90, 0.3, "a new boot on the target")
    assert boots == [last_on_source], (boots, last_on_source)
    assert BOOT_MARKER in hn.serial_log(dst, dom)
    hn.wait_for_serial(dst, dom, rf"^VF-COUNTER {last_on_source + 2}\s*$", timeout=60)

    def handed_over() -> dict[str, Any] | None:
        vm = system.get("vm", "parcel", namespace)
        ok = (
            vm["status"].get("nodeName") == dst.name
            and vm["metadata"]["labels"].get(NODE_LABEL) == dst.name
            and vm["status"].get("printableStatus") == "Running"
            and f"virtfleet.io/agent-{dst.name}" in vm["metadata"].get("finalizers", [])
            and f"virtfleet.io/agent-{src.name}" not in vm["metadata"].get("finalizers", [])
        )
        return vm if ok else None

    wait_for(handed_over, 60, 0.3, "VM handed over and Running on the target")
    uid = system.get("vm", "parcel", namespace)["metadata"]["uid"]
    assert f"{uid}-data" not in virsh(src, "vol-list", hn.LOCAL_POOL), "source volume kept"
    print(
        f"\n[migration] offline: counter {last_on_source} on {src.name}, boot "
        f"{boots} on {dst.name}; {t_offline:.2f}s apply → Succeeded"
    )


def test_post_copy_switch_when_pre_copy_stalls(system: Cluster, namespace: str) -> None:
    from harness import operators
    from harness.guest import guest_cmdline

    # The guest rewrites 8 MiB of RAM all the time: at 2 MiB/s pre-copy never converges.
    src, dst = running_vm(system, namespace, "stuck", cmdline=guest_cmdline(extra="vf.dirty=8"))
    dom = domain_name(namespace, "stuck")
    wait_for(lambda: max(uptimes(src, dom), default=0) >= 3, 60, what="uptime 3 s")
    policy = {"postCopy": True, "bandwidthMiBps": 2}
    system.apply(migration("stuck-1", namespace, "stuck", targetNode=dst.name, policy=policy))
    mig = wait_phase(system, namespace, "stuck-1", ("Succeeded", "Failed"), timeout=300)
    assert mig["status"]["phase"] == "Succeeded", mig["status"]
    log = operators.log_path(system.state_dir, f"agent-{src.name}").read_text()
    switched = [
        line for line in log.splitlines() if "switched to post-copy" in line and "stuck-1" in line
    ]
    assert switched, "the agent never switched to post-copy"
    last_on_source = max(uptimes(src, dom))
    wait_for(
        lambda: max(uptimes(dst, dom), default=0) >= last_on_source + 3,
        60,
        what="uptime counting on the target",
    )
    assert not has_domain(src, dom)
    print(f"\n[migration] post-copy: {switched[0][:300]}")
