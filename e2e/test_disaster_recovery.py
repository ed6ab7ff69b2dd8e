"""Disaster recovery: a fresh cluster restores a VM from the bucket alone.

The suite's system backs a counting guest up; then a second, freshly made system (its
own control plane, etcd, libvirt nodes and operators, ports of its own) is pointed at the
same bucket. Nothing passes between the two but the bucket: the new cluster's location
finds the backups there (read-only VMBackups, like Velero's backup sync), a VMRestore
makes the VM, and its guest boots with the counter it had when it was backed up.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from harness import cluster as local_system
from harness import nodes as hn
from harness import operators, rbac, underlay
from harness.backups import (
    BOOT,
    DATA,
    backup,
    backup_done,
    counts,
    empty_bucket,
    location,
    location_phase,
    restore,
    restore_done,
    running_on,
    s3,
)
from harness.guest import guest_cmdline
from harness.testing import Cluster, condition, domain_name, vm_manifest, wait_for

#: Ports of its own, below the ephemeral range and apart from test_system's (25xxx) and
#: test_install's (26xxx-28xxx).
OWN_PORTS = {
    "VIRTFLEET_ETCD_CLIENT_PORT": "24790",
    "VIRTFLEET_ETCD_PEER_PORT": "24800",
    "VIRTFLEET_APISERVER_PORT": "24443",
    "VIRTFLEET_CONTROLLER_MANAGER_PORT": "24257",
    "VIRTFLEET_NODE_PORT_BASE": "24610",
    "VIRTFLEET_OBJECTSTORE_PORT": "24300",
    "VIRTFLEET_PROMETHEUS_PORT": "24090",
    "VIRTFLEET_CONTROLLER_METRICS_PORT": "24453",
    "VIRTFLEET_MIGRATION_PORT_BASE": "24000",
}


@pytest.fixture
def fresh(system: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A second system with operators, made for this test and wiped after it. Its nodes
    reach the first system's object store (the bucket both share) on their loopback."""
    for key, value in OWN_PORTS.items():
        monkeypatch.setenv(key, value)
    store = urlsplit(system.env["VIRTFLEET_S3_ENDPOINT"]).port
    monkeypatch.setenv(underlay.EXTRA_PORTS_VAR, str(store))
    state_dir = tmp_path / "fresh"
    try:
        env = local_system.up(state_dir)
        env.update(rbac.chart_identities(state_dir, env))
        operators.start(state_dir, env)
        other = Cluster(state_dir=state_dir, env=env, nodes=hn.nodes_from_env(env))

        def hosts_ready() -> bool:
            out = other.kubectl("get", "vmhost", "-o", "name", check=False).stdout.split()
            return len(out) == len(other.nodes)

        wait_for(hosts_ready, 90, 0.5, "a VMHost from every agent of the fresh cluster")
        yield other
    finally:
        # VIRTFLEET_E2E_KEEP=1 keeps its state (logs) for a look after a failure.
        keep = bool(os.environ.get("VIRTFLEET_E2E_KEEP"))
        local_system.down(state_dir, wipe=not keep, wipe_bucket=not keep)


def test_a_fresh_cluster_restores_a_vm_from_the_bucket_alone(
    system: Cluster, namespace: str, fresh: Cluster
) -> None:
    bucket = f"dr-{uuid.uuid4().hex[:10]}"
    s3(system).create_bucket(Bucket=bucket)
    location(system, namespace, bucket)
    location_phase(system, namespace, "default", "Available")
    system.apply(vm_manifest("keeper", namespace, cmdline=guest_cmdline(counter=True), disks=DATA))
    node = running_on(system, namespace, "keeper")
    dom = domain_name(namespace, "keeper")
    hn.wait_for_serial(node, dom, r"^VF-COUNTER 3\s*$", timeout=90)
    before = max(counts(node, dom))
    backup(system, namespace, "keeper-1", "keeper")
    assert backup_done(system, namespace, "keeper-1")["status"]["phase"] == "Completed"
    after = max(counts(node, dom))

    # The fresh cluster: the same namespace and a location on the same bucket and prefix
    # (the store is the first system's: the one thing the two share).
    fresh.kubectl("create", "namespace", namespace)
    fresh.env["VIRTFLEET_S3_ENDPOINT"] = system.env["VIRTFLEET_S3_ENDPOINT"]
    fresh.env["VIRTFLEET_S3_ACCESS_KEY"] = system.env["VIRTFLEET_S3_ACCESS_KEY"]
    fresh.env["VIRTFLEET_S3_SECRET_KEY"] = system.env["VIRTFLEET_S3_SECRET_KEY"]
    location(fresh, namespace, bucket)
    found = location_phase(fresh, namespace, "default", "Available")
    assert found["status"]["backupCount"] == 1

    def synced() -> dict[str, Any] | None:
        got = fresh.kubectl("get", "vmbackup", "keeper-1", "-n", namespace, check=False)
        if got.returncode != 0:
            return None
        obj = fresh.get("vmbackup", "keeper-1", namespace)
        return obj if (obj.get("status") or {}).get("phase") == "Completed" else None

    mirrored = wait_for(synced, 90, 0.5, "the backup synced into the fresh cluster")
    assert mirrored["status"]["synced"] is True
    assert mirrored["spec"]["deletionPolicy"] == "Retain"
    assert condition(mirrored, "Ready")["reason"] == "Synced"  # type: ignore[index]

    restore(fresh, namespace, "back-1", "keeper", "keeper-1")
    result = restore_done(fresh, namespace, "back-1")
    assert result["status"]["phase"] == "Succeeded", result["status"]
    where = running_on(fresh, namespace, "keeper")
    booted = hn.wait_for_serial(where, dom, BOOT, timeout=90)
    value = int(booted.group(1))
    assert before <= value <= after, (before, value, after)
    print(
        f"\n[dr] fresh cluster restored keeper on {where.name}: counter {value} "
        f"(backup taken at {before}..{after})"
    )
    # Deleting a synced backup keeps the objects (Retain): they belong to the cluster
    # that made them.
    fresh.kubectl("delete", "vmbackup", "keeper-1", "-n", namespace, "--wait=true")
    keys = [o["Key"] for o in s3(system).list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("keeper-1/manifest.json") for k in keys), keys
    empty_bucket(system, bucket)
    s3(system).delete_bucket(Bucket=bucket)
