"""VMBackup on the real system: real guests, libvirt's backup job, the harness's S3 store.

Proved from the outside: the guest's console (its disk counter after a restore), the
bucket's objects (read with boto3 and hashed), ``virsh`` on the nodes (checkpoints),
``qemu-img`` on the volumes (bit-for-bit), and ``kubectl get`` of the objects.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from harness import nodes as hn
from harness import objectstore, operators, pidfiles
from harness.backups import (
    BOOT,
    DATA,
    MiB,
    backup,
    backup_done,
    check_bucket_matches_manifests,
    counts,
    location,
    location_phase,
    objects,
    raw_sha256,
    restore,
    restore_done,
    running_on,
    s3,
    scratch_files,
    virsh,
)
from harness.guest import guest_cmdline
from harness.testing import Cluster, condition, domain_name, vm_manifest, wait_for
from virtfleet.api.conditions import parse_rfc3339


def test_a_running_guest_is_backed_up_and_restored_as_a_new_vm_on_the_other_node(
    system: Cluster, namespace: str, bucket: str
) -> None:
    location(system, namespace, bucket)
    ready = location_phase(system, namespace, "default", "Available")
    assert condition(ready, "Ready")["status"] == "True"  # type: ignore[index]
    first = system.nodes[0]
    system.apply(
        vm_manifest(
            "tally", namespace, cmdline=guest_cmdline(counter=True), disks=DATA,
            nodeName=first.name,
        )
    )  # fmt: skip
    src = running_on(system, namespace, "tally")
    dom = domain_name(namespace, "tally")
    hn.wait_for_serial(src, dom, r"^VF-COUNTER 3\s*$", timeout=90)
    before = max(counts(src, dom))
    backup(system, namespace, "tally-1", "tally")
    done = backup_done(system, namespace, "tally-1")
    after = max(counts(src, dom))
    st = done["status"]
    assert st["phase"] == "Completed", st
    assert st["type"] == "Full"
    assert st["progress"]["percent"] == 100
    assert st["nodeName"] == src.name
    assert st["checkpoint"]
    assert condition(done, "Ready")["status"] == "True"  # type: ignore[index]
    # The guest kept running: its counter went on during the backup, no reboot.
    assert "VF-COUNTER-BOOT" in hn.serial_log(src, dom)
    assert hn.serial_log(src, dom).count("VF-COUNTER-BOOT") == 1
    # The bucket holds the manifest (written last) and the disk, hashes as recorded.
    (manifest,) = check_bucket_matches_manifests(system, bucket)
    assert manifest["vm"]["spec"]["disks"][0]["name"] == "data"
    assert manifest["type"] == "Full"
    assert manifest["parent"] is None
    # A checkpoint stays on the domain for the next incremental; the scratch file went.
    assert virsh(src, "checkpoint-list", dom, "--name").split() == [st["checkpoint"]]
    assert not scratch_files(src, system.get("vm", "tally", namespace)["metadata"]["uid"])

    other = next(n for n in system.nodes if n.name != src.name)
    restore(system, namespace, "copy-1", "copy", "tally-1", nodeName=other.name)
    result = restore_done(system, namespace, "copy-1")
    assert result["status"]["phase"] == "Succeeded", result["status"]
    copy = system.get("vm", "copy", namespace)
    assert copy["status"]["nodeName"] == other.name
    assert copy["spec"]["disks"][0]["source"] == {
        "backup": {"backupName": "tally-1", "disk": "data"}
    }
    assert copy["metadata"]["uid"] != system.get("vm", "tally", namespace)["metadata"]["uid"]
    copy_dom = domain_name(namespace, "copy")
    booted = hn.wait_for_serial(other, copy_dom, BOOT, timeout=90)
    value = int(booted.group(1))
    # The restored disk is the disk as the backup job saw it: between the counter read
    # just before the backup was asked for and the one after it completed.
    assert before <= value <= after, (before, value, after)
    hn.wait_for_serial(other, copy_dom, rf"^VF-COUNTER {value + 2}\s*$", timeout=60)
    print(f"\n[backup] counter {before}..{after} at backup, restored guest booted at {value}")


def test_an_incremental_uploads_what_changed_and_restores_bit_for_bit(
    system: Cluster, namespace: str, bucket: str
) -> None:
    location(system, namespace, bucket)
    location_phase(system, namespace, "default", "Available")
    fill_mib = 8
    # No counter: after VF-FILLED the guest writes nothing, so the disk stays as backed up.
    cmdline = guest_cmdline(extra=f"vf.fill={fill_mib}@25")
    system.apply(vm_manifest("filler", namespace, cmdline=cmdline, disks=DATA))
    node = running_on(system, namespace, "filler")
    dom = domain_name(namespace, "filler")
    hn.wait_for_serial(node, dom, r"^VF-UPTIME", timeout=90)
    backup(system, namespace, "filler-1", "filler")
    full = backup_done(system, namespace, "filler-1")["status"]
    assert full["phase"] == "Completed", full
    assert full["type"] == "Full", full
    assert "VF-FILLED" not in hn.serial_log(node, dom), "the fill began before the full backup"
    hn.wait_for_serial(node, dom, rf"^VF-FILLED {fill_mib}\s*$", timeout=90)
    backup(system, namespace, "filler-2", "filler")
    incr = backup_done(system, namespace, "filler-2")["status"]
    assert incr["phase"] == "Completed", incr
    assert incr["type"] == "Incremental"
    assert incr["parent"] == "filler-1"
    uploaded = incr["uploadedBytes"]
    # About the written MiB: the changed clusters plus qcow2 metadata (under 1 MiB here).
    assert fill_mib * MiB <= uploaded <= (fill_mib + 1) * MiB, uploaded
    manifests = check_bucket_matches_manifests(system, bucket)
    assert sorted(m["type"] for m in manifests) == ["Full", "Incremental"]
    uid = system.get("vm", "filler", namespace)["metadata"]["uid"]
    original = raw_sha256(node, hn.LOCAL_POOL, f"{uid}-data.qcow2")

    restore(system, namespace, "again-1", "again", "filler-2")
    assert restore_done(system, namespace, "again-1")["status"]["phase"] == "Succeeded"
    again = system.get("vm", "again", namespace)
    where = system.node(again["status"]["nodeName"])
    restored = raw_sha256(where, hn.LOCAL_POOL, f"{again['metadata']['uid']}-data.backup-base")
    assert restored == original
    print(
        f"\n[backup] full {full['uploadedBytes']} B, incremental after {fill_mib} MiB: "
        f"{uploaded} B; restored chain sha256 {restored[:16]}… = original"
    )

    # Deleting the full backup while the incremental builds on it: held, with the reason.
    system.kubectl("delete", "vmbackup", "filler-1", "-n", namespace, "--wait=false")

    def blocked() -> dict[str, Any] | None:
        obj = system.get("vmbackup", "filler-1", namespace)
        stalled = condition(obj, "Stalled")
        return obj if stalled and stalled["reason"] == "DeletionBlocked" else None

    held = wait_for(blocked, 30, 0.3, "filler-1 held by filler-2")
    assert "filler-2" in condition(held, "Stalled")["message"]  # type: ignore[index]
    assert any("/filler-1/" in k for k in objects(system, bucket))
    system.kubectl("delete", "vmbackup", "filler-2", "-n", namespace, "--wait=true")
    wait_for(
        lambda: (
            system.kubectl("get", "vmbackup", "filler-1", "-n", namespace, check=False).returncode
            != 0
        ),
        30,
        0.3,
        "filler-1 deleted once nothing depends on it",
    )
    assert objects(system, bucket) == {}, "objects left in the bucket"


def test_a_location_says_why_it_is_unavailable_and_its_backups_wait(
    system: Cluster, namespace: str, bucket: str
) -> None:
    location(system, namespace, bucket, name="wrong-key", secret="not-the-secret")
    location(system, namespace, f"{bucket}-missing", name="no-bucket")
    denied = location_phase(system, namespace, "wrong-key", "Unavailable")
    assert condition(denied, "Stalled")["reason"] == "AccessDenied", denied["status"]  # type: ignore[index]
    assert "credentials" in denied["status"]["message"]
    missing = location_phase(system, namespace, "no-bucket", "Unavailable")
    assert condition(missing, "Stalled")["reason"] == "BucketNotFound", missing["status"]  # type: ignore[index]
    system.apply(vm_manifest("idle", namespace, disks=DATA))
    running_on(system, namespace, "idle")
    backup(system, namespace, "idle-1", "idle", location="no-bucket")

    def waiting() -> dict[str, Any] | None:
        obj = system.get("vmbackup", "idle-1", namespace)
        cond = condition(obj, "Reconciling")
        return obj if cond and cond["reason"] == "LocationUnavailable" else None

    obj = wait_for(waiting, 60, 0.3, "the backup waiting for its location")
    assert obj["status"]["phase"] == "Pending"
    assert "does not exist" in condition(obj, "Ready")["message"]  # type: ignore[index]


def test_snapshot_restores_and_migrations_still_work_after_a_backup(
    system: Cluster, namespace: str, bucket: str
) -> None:
    """A backup's checkpoint (a dirty bitmap) made QEMU refuse a revert and killed the
    domain, and live migration took bitmaps along without libvirt's checkpoints."""
    location(system, namespace, bucket)
    location_phase(system, namespace, "default", "Available")
    system.apply(vm_manifest("mover", namespace, cmdline=guest_cmdline(counter=True), disks=DATA))
    src = running_on(system, namespace, "mover")
    dom = domain_name(namespace, "mover")
    hn.wait_for_serial(src, dom, r"^VF-COUNTER 2\s*$", timeout=90)
    backup(system, namespace, "mover-1", "mover")
    assert backup_done(system, namespace, "mover-1")["status"]["phase"] == "Completed"
    assert virsh(src, "checkpoint-list", dom, "--name").split(), "no checkpoint to test with"
    snapshot_and_revert(system, namespace, "mover", "s1")
    assert virsh(src, "checkpoint-list", dom, "--name").split() == []
    backup(system, namespace, "mover-2", "mover")
    second = backup_done(system, namespace, "mover-2")["status"]
    assert second["phase"] == "Completed", second
    assert second["type"] == "Full", second

    dst = next(n for n in system.nodes if n.name != src.name)
    system.kubectl("delete", "vmsnapshot", "s1", "-n", namespace, "--wait=true")
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMMigration",
            "metadata": {"name": "mover-away", "namespace": namespace},
            "spec": {"vmName": "mover", "targetNode": dst.name},
        }
    )

    def migrated() -> str | None:
        phase = (system.get("vmmig", "mover-away", namespace).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    assert wait_for(migrated, 180, 0.5, "migration finished") == "Succeeded"
    assert running_on(system, namespace, "mover").name == dst.name
    snapshot_and_revert(system, namespace, "mover", "s2")
    backup(system, namespace, "mover-3", "mover", mode="Incremental")
    third = backup_done(system, namespace, "mover-3")
    assert third["status"]["phase"] == "Failed"
    assert condition(third, "Stalled")["reason"] == "NoCheckpoint"  # type: ignore[index]
    backup(system, namespace, "mover-4", "mover")
    assert backup_done(system, namespace, "mover-4")["status"]["type"] == "Full"


def snapshot_and_revert(system: Cluster, namespace: str, vm: str, name: str) -> None:
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMSnapshot",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"vmName": vm},
        }
    )
    wait_for(
        lambda: (system.get("vmsnap", name, namespace).get("status") or {}).get("phase") == "Ready",
        90,
        0.3,
        f"snapshot {name} Ready",
    )
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMRestore",
            "metadata": {"name": f"{name}-back", "namespace": namespace},
            "spec": {"vmName": vm, "snapshotName": name},
        }
    )

    def finished() -> str | None:
        phase = (system.get("vmrestore", f"{name}-back", namespace).get("status") or {}).get(
            "phase"
        )
        return phase if phase in ("Succeeded", "Failed") else None

    assert wait_for(finished, 120, 0.3, f"revert to {name}") == "Succeeded"
    running_on(system, namespace, vm)


def test_the_agent_and_the_store_killed_mid_backup_never_leave_a_broken_one(
    system: Cluster, namespace: str, bucket: str
) -> None:
    # A bandwidth limit makes the upload of 48 MiB last ~6 s: time to kill things in it.
    location(system, namespace, bucket, bandwidthLimit="8Mi")
    location_phase(system, namespace, "default", "Available")
    system.apply(
        vm_manifest("busy", namespace, cmdline=guest_cmdline(extra="vf.fill=48@1"), disks=DATA)
    )
    node = running_on(system, namespace, "busy")
    dom = domain_name(namespace, "busy")
    hn.wait_for_serial(node, dom, r"^VF-FILLED 48\s*$", timeout=120)
    agent = f"agent-{node.name}"

    def uploading(name: str) -> bool:
        return (system.get("vmbackup", name, namespace).get("status") or {}).get(
            "phase"
        ) == "Uploading"

    backup(system, namespace, "busy-1", "busy")
    wait_for(lambda: uploading("busy-1"), 60, 0.05, "busy-1 uploading")
    operators.kill(system.state_dir, agent, signal.SIGKILL)
    assert "busy-1" not in "".join(k for k in objects(system, bucket) if "manifest" in k)
    operators.start_agent(system.state_dir, system.env, node)
    first = backup_done(system, namespace, "busy-1", timeout=180)["status"]
    print(
        f"\n[backup] agent SIGKILLed while uploading: {first['phase']}, attempt {first['attempt']}"
    )
    assert first["phase"] in ("Completed", "Failed"), first

    backup(system, namespace, "busy-2", "busy", mode="Full")
    wait_for(lambda: uploading("busy-2"), 60, 0.05, "busy-2 uploading")
    weed = objectstore._dir(system.state_dir) / "weed.pid"
    pid = pidfiles.running(weed)
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    time.sleep(3)
    objectstore.up(system.state_dir)
    second = backup_done(system, namespace, "busy-2", timeout=180)["status"]
    print(
        f"[backup] store SIGKILLed while uploading: {second['phase']}, attempt {second['attempt']}"
    )
    assert second["phase"] in ("Completed", "Failed"), second
    # Whatever ended, no manifest names an object that is missing or differs.
    manifests = check_bucket_matches_manifests(system, bucket)
    complete = {m["backup"]["name"] for m in manifests}
    for name, st in (("busy-1", first), ("busy-2", second)):
        assert (name in complete) == (st["phase"] == "Completed"), (name, st["phase"])
    # libvirtd SIGKILLed while the agent streams the scratch file out of it.
    backup(system, namespace, "busy-3", "busy", mode="Full")
    wait_for(lambda: uploading("busy-3"), 60, 0.05, "busy-3 uploading")
    hn.restart_libvirtd(node, crash=True)
    third = backup_done(system, namespace, "busy-3", timeout=180)["status"]
    print(
        f"[backup] libvirtd SIGKILLed while uploading: {third['phase']}, attempt {third['attempt']}"
    )
    assert third["phase"] in ("Completed", "Failed"), third
    assert system.get("vm", "busy", namespace)["status"]["printableStatus"] == "Running"
    manifests = check_bucket_matches_manifests(system, bucket)
    assert ("busy-3" in {m["backup"]["name"] for m in manifests}) == (third["phase"] == "Completed")
    # The next backup works, and no scratch file is left on the node.
    backup(system, namespace, "busy-4", "busy")
    fourth = backup_done(system, namespace, "busy-4", timeout=180)["status"]
    assert fourth["phase"] == "Completed", fourth
    uid = system.get("vm", "busy", namespace)["metadata"]["uid"]
    assert not scratch_files(node, uid)


def test_a_schedule_backs_up_on_time_and_prunes_without_breaking_a_chain(
    system: Cluster, namespace: str, bucket: str
) -> None:
    location(system, namespace, bucket)
    location_phase(system, namespace, "default", "Available")
    system.apply(vm_manifest("daily", namespace, disks=DATA))
    running_on(system, namespace, "daily")
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMBackupSchedule",
            "metadata": {"name": "often", "namespace": namespace},
            "spec": {
                "schedule": "@every 5s",
                "vmName": "daily",
                "location": "default",
                "fullEvery": 2,
                "retention": {"keepLast": 2},
                "startingDeadline": "4s",
            },
        }
    )

    def scheduled() -> list[dict[str, Any]]:
        out = system.kubectl(
            "get", "vmbackup", "-n", namespace, "-l", "virtfleet.io/schedule=often", "-o", "json"
        ).stdout
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    made: dict[str, dict[str, Any]] = {}

    def five_made() -> bool:
        for item in scheduled():
            made.setdefault(item["metadata"]["name"], item)
        return len(made) >= 5

    wait_for(five_made, 120, 0.5, "five scheduled backups")
    for item in made.values():
        moment = parse_rfc3339(item["metadata"]["annotations"]["virtfleet.io/scheduled-time"])
        created = parse_rfc3339(item["metadata"]["creationTimestamp"])
        # On time: within the deadline of its moment (second-resolution timestamps).
        assert 0 <= (created - moment).total_seconds() <= 5, item["metadata"]

    def pruned() -> list[dict[str, Any]] | None:
        items = [i for i in scheduled() if not i["metadata"].get("deletionTimestamp")]
        done = [i for i in items if (i.get("status") or {}).get("phase") == "Completed"]
        return done if len(done) <= 3 and len(made) >= 5 else None

    kept = wait_for(pruned, 60, 1.0, "retention applied")
    names = {i["metadata"]["name"] for i in kept}
    # Every kept incremental's parent is kept: the chain restores.
    for item in kept:
        parent = item["status"].get("parent")
        assert parent is None or parent in names, (item["metadata"]["name"], parent, names)
    # fullEvery 2: the first backup is full, then every second one.
    modes = [made[n]["spec"]["mode"] for n in sorted(made)]
    assert modes[:4] == ["Full", "Auto", "Full", "Auto"], modes
    print(f"\n[schedule] made {sorted(made)}; kept {sorted(names)}; modes {modes}")

    # The bucket holds exactly the kept backups (pruned objects deleted with their objects).
    def bucket_matches() -> bool:
        manifests = check_bucket_matches_manifests(system, bucket)
        live = {
            i["metadata"]["name"] for i in scheduled() if not i["metadata"].get("deletionTimestamp")
        }
        complete = {
            i["metadata"]["name"]
            for i in scheduled()
            if (i.get("status") or {}).get("phase") == "Completed"
        }
        return complete <= {m["backup"]["name"] for m in manifests} <= live

    wait_for(bucket_matches, 60, 1.0, "the bucket to hold exactly the kept backups")

    # A run the controller could not start (it was down) is reported, not made up later.
    operators.kill(system.state_dir, "controller", signal.SIGKILL)
    time.sleep(12)
    operators.start_controller(system.state_dir, system.env)

    def missed() -> dict[str, Any] | None:
        obj = system.get("vmbackupschedule", "often", namespace)
        return obj if (obj.get("status") or {}).get("missedRuns", 0) >= 1 else None

    reported = wait_for(missed, 60, 0.5, "missed runs reported")
    events = system.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=MissedSchedule", "-o", "name"
    ).stdout
    assert events.strip(), "no MissedSchedule Event"
    print(f"[schedule] controller down 12 s: missedRuns {reported['status']['missedRuns']}")
    # The schedule stops before the bucket goes: a run still uploading would put an
    # object into it after the fixture emptied it (CI: BucketNotEmpty at teardown).
    system.kubectl("delete", "vmbackupschedule", "often", "-n", namespace, "--wait=true")

    def settled() -> bool:
        listed = system.kubectl("get", "vmbackup", "-n", namespace, "-o", "json").stdout
        phases = [(b.get("status") or {}).get("phase") for b in json.loads(listed)["items"]]
        return all(p in ("Completed", "Failed") for p in phases)

    wait_for(settled, 180, 1.0, "the schedule's last backups to end")


def test_a_stopped_vm_is_backed_up_from_its_volumes_and_restored_into_itself(
    system: Cluster, namespace: str, bucket: str
) -> None:
    """A stopped VM's backup copies its volumes (no job, no checkpoint); restoring it into
    the same VM waits for the VM to stop, then replaces its disk bit for bit: the guest
    boots with the counter it had when it was backed up."""
    location(system, namespace, bucket)
    location_phase(system, namespace, "default", "Available")
    system.apply(vm_manifest("keep", namespace, cmdline=guest_cmdline(counter=True), disks=DATA))
    node = running_on(system, namespace, "keep")
    dom = domain_name(namespace, "keep")
    hn.wait_for_serial(node, dom, r"^VF-COUNTER 3\s*$", timeout=90)
    set_strategy(system, namespace, "keep", "Halted")
    uid = system.get("vm", "keep", namespace)["metadata"]["uid"]
    at_backup = raw_sha256(node, hn.LOCAL_POOL, f"{uid}-data.qcow2")

    backup(system, namespace, "keep-1", "keep")
    st = backup_done(system, namespace, "keep-1")["status"]
    assert st["phase"] == "Completed", st
    assert st["type"] == "Full"
    assert not st.get("checkpoint"), st
    assert st["uploadedBytes"] > 0
    assert virsh(node, "checkpoint-list", dom, "--name").split() == []
    assert not scratch_files(node, uid)
    check_bucket_matches_manifests(system, bucket)

    # The guest runs on from that disk and writes more; then the backup is restored into it.
    offset = len(hn.serial_log(node, dom))
    set_strategy(system, namespace, "keep", "Always", wait_for_stop=False)
    booted = int(hn.wait_for_serial(node, dom, BOOT, timeout=90, after=offset).group(1))
    hn.wait_for_serial(node, dom, rf"^VF-COUNTER {booted + 3}\s*$", timeout=60, after=offset)
    restore(system, namespace, "keep-back", "keep", "keep-1")

    def waiting() -> dict[str, Any] | None:
        obj = system.get("vmrestore", "keep-back", namespace)
        ready = condition(obj, "Ready")
        return obj if ready and ready["reason"] == "VMRunning" else None

    pending = wait_for(waiting, 60, 0.3, "keep-back waiting for the VM to stop")
    assert pending["status"]["phase"] == "Pending"
    assert raw_sha256(node, hn.LOCAL_POOL, f"{uid}-data.qcow2") != at_backup

    set_strategy(system, namespace, "keep", "Halted")
    done = restore_done(system, namespace, "keep-back")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["nodeName"] == node.name
    assert system.get("vm", "keep", namespace)["metadata"]["uid"] == uid  # the same VM
    assert raw_sha256(node, hn.LOCAL_POOL, f"{uid}-data.qcow2") == at_backup

    offset = len(hn.serial_log(node, dom))
    set_strategy(system, namespace, "keep", "Always", wait_for_stop=False)
    again = int(hn.wait_for_serial(node, dom, BOOT, timeout=90, after=offset).group(1))
    assert again == booted, (booted, again)
    print(f"\n[backup] stopped VM backed up and restored into itself: boots at {again} again")

    # A backup of one VM is never restored over another.
    system.apply(vm_manifest("other", namespace, disks=DATA, runStrategy="Halted"))
    restore(system, namespace, "wrong", "other", "keep-1")
    refused = restore_done(system, namespace, "wrong", timeout=60)
    assert refused["status"]["phase"] == "Failed"
    assert condition(refused, "Stalled")["reason"] == "BackupOfAnotherVM"  # type: ignore[index]

    # A name the bucket already holds (another cluster's backup, say) is never written
    # over. (Its manifest here is one the location's sync skips, so no synced VMBackup of
    # that name races the new one.)
    taken = f"cluster-a/backups/{namespace}/keep-3/manifest.json"
    s3(system).put_object(Bucket=bucket, Key=taken, Body=b"[]")
    backup(system, namespace, "keep-3", "keep")
    clash = backup_done(system, namespace, "keep-3", timeout=60)
    assert clash["status"]["phase"] == "Failed"
    assert condition(clash, "Stalled")["reason"] == "BackupExists"  # type: ignore[index]
    assert [k for k in objects(system, bucket) if "/keep-3/" in k] == [taken]


def set_strategy(
    system: Cluster, namespace: str, vm: str, strategy: str, *, wait_for_stop: bool = True
) -> None:
    patch = json.dumps({"spec": {"runStrategy": strategy}})
    system.kubectl("patch", "vm", vm, "-n", namespace, "--type=merge", "-p", patch)
    if wait_for_stop:
        wait_for(
            lambda: (
                (system.get("vm", vm, namespace).get("status") or {}).get("printableStatus")
                == "Stopped"
            ),
            60,
            0.3,
            f"vm {vm} Stopped",
        )


def test_a_node_out_of_space_fails_the_backup_with_the_reason_and_leaves_nothing(
    system: Cluster, namespace: str, bucket: str
) -> None:
    """The disk lives on a small tmpfs pool that holds it but not a copy of it: the backup
    job runs out of space, is tried 3 times, then Failed with libvirt's reason; no scratch
    file, no checkpoint and no manifest are left, and the guest runs on."""
    location(system, namespace, bucket)
    location_phase(system, namespace, "default", "Available")
    fill = hn.SMALL_POOL_MIB * 6 // 10  # the disk holds 60 % of the pool: no room for a copy
    disk = [{"name": "data", "size": "64Mi", "pool": hn.SMALL_POOL, "source": {"blank": {}}}]
    cmdline = guest_cmdline(extra=f"vf.fill={fill}@1")
    system.apply(vm_manifest("crowded", namespace, cmdline=cmdline, disks=disk))
    node = running_on(system, namespace, "crowded")
    dom = domain_name(namespace, "crowded")
    hn.wait_for_serial(node, dom, rf"^VF-FILLED {fill}\s*$", timeout=120)

    backup(system, namespace, "crowded-1", "crowded")
    failed = backup_done(system, namespace, "crowded-1", timeout=120)
    st = failed["status"]
    stalled = condition(failed, "Stalled")
    print(f"\n[backup] out of space: {st['phase']} after {st['attempt']} attempts: {st['error']}")
    assert st["phase"] == "Failed", st
    assert st["attempt"] == 3
    assert stalled is not None
    assert stalled["reason"] == "BackupFailed"
    assert "attempt 3 of 3" in stalled["message"]
    uid = system.get("vm", "crowded", namespace)["metadata"]["uid"]
    assert not scratch_files(node, uid, hn.SMALL_POOL)
    assert virsh(node, "checkpoint-list", dom, "--name").split() == []
    assert objects(system, bucket) == {}
    assert system.get("vm", "crowded", namespace)["status"]["printableStatus"] == "Running"
