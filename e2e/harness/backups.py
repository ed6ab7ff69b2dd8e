"""Helpers of the backup tests: the store's client, locations, backups and restores.

Shared by ``e2e/test_backups.py`` and ``e2e/test_disaster_recovery.py`` (the latter drives
two systems, so every helper takes the :class:`~harness.testing.Cluster` it acts on).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from harness import nodes as hn
from harness.testing import Cluster, wait_for

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

COUNTER = re.compile(r"^VF-COUNTER (\d+)\s*$", re.MULTILINE)
BOOT = re.compile(r"^VF-COUNTER-BOOT (\d+)\s*$", re.MULTILINE)
MiB = 2**20


def s3(cluster: Cluster) -> S3Client:
    env = cluster.env
    return boto3.client(
        "s3",
        endpoint_url=env["VIRTFLEET_S3_ENDPOINT"],
        aws_access_key_id=env["VIRTFLEET_S3_ACCESS_KEY"],
        aws_secret_access_key=env["VIRTFLEET_S3_SECRET_KEY"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def location(
    system: Cluster, namespace: str, bucket: str, name: str = "default", **spec: Any
) -> None:
    """The Secret with the store's key pair and a VMBackupLocation using it."""
    env = system.env
    secret = spec.pop("secret", env["VIRTFLEET_S3_SECRET_KEY"])
    system.kubectl(
        "create", "secret", "generic", f"s3-{name}", "-n", namespace,
        f"--from-literal=accessKeyID={env['VIRTFLEET_S3_ACCESS_KEY']}",
        f"--from-literal=secretAccessKey={secret}",
    )  # fmt: skip
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMBackupLocation",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "endpoint": env["VIRTFLEET_S3_ENDPOINT"],
                "bucket": bucket,
                "prefix": "cluster-a",
                "credentialsSecret": {"name": f"s3-{name}"},
                **spec,
            },
        }
    )


def location_phase(system: Cluster, namespace: str, name: str, phase: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = system.get("vmbackuplocation", name, namespace)
        return obj if (obj.get("status") or {}).get("phase") == phase else None

    found: dict[str, Any] = wait_for(check, 60, 0.3, f"location {name} {phase}")
    return found


def backup(system: Cluster, namespace: str, name: str, vm: str, **spec: Any) -> None:
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMBackup",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"vmName": vm, "location": "default", **spec},
        }
    )


def backup_done(system: Cluster, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = system.get("vmbackup", name, namespace)
        return obj if (obj.get("status") or {}).get("phase") in ("Completed", "Failed") else None

    found: dict[str, Any] = wait_for(check, timeout, 0.3, f"vmbackup {name} finished")
    return found


def restore(system: Cluster, namespace: str, name: str, vm: str, backup: str, **spec: Any) -> None:
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMRestore",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"vmName": vm, "backupName": backup, **spec},
        }
    )


def restore_done(
    system: Cluster, namespace: str, name: str, timeout: float = 180
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = system.get("vmrestore", name, namespace)
        return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    found: dict[str, Any] = wait_for(check, timeout, 0.5, f"vmrestore {name} finished")
    return found


def running_on(system: Cluster, namespace: str, name: str) -> hn.Node:
    def check() -> str | None:
        st = system.get("vm", name, namespace).get("status") or {}
        return st.get("nodeName") if st.get("printableStatus") == "Running" else None

    return system.node(wait_for(check, 120, 0.3, f"vm {name} Running"))


def counts(node: hn.Node, dom: str) -> list[int]:
    return [int(m.group(1)) for m in COUNTER.finditer(hn.serial_log(node, dom))]


def objects(system: Cluster, bucket: str) -> dict[str, bytes]:
    client = s3(system)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        str(o["Key"]): client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed
    }


def check_bucket_matches_manifests(system: Cluster, bucket: str) -> list[dict[str, Any]]:
    """Every manifest's objects exist and hash to what it says: a complete backup is whole."""
    found = objects(system, bucket)
    manifests = [json.loads(v) for k, v in found.items() if k.endswith("/manifest.json")]
    for manifest in manifests:
        for disk in manifest["disks"]:
            data = found[disk["objectKey"]]
            assert len(data) == disk["uploadedBytes"]
            size = disk["partSize"]
            parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
            digests = [hashlib.sha256(p).hexdigest() for p in parts]
            assert digests == disk["partSha256"], disk["objectKey"]
            summary = hashlib.sha256("".join(digests).encode()).hexdigest()
            assert summary == disk["sha256"], disk["objectKey"]
    return manifests


def raw_sha256(node: hn.Node, pool: str, volume: str) -> str:
    """The guest-visible bytes of a volume (qemu-img convert to raw), hashed."""
    path = node.pool_dir(pool) / volume
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "disk.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw)],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        return hashlib.sha256(raw.read_bytes()).hexdigest()


def virsh(node: hn.Node, *args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", node.uri, *args], capture_output=True, text=True, check=True
    ).stdout


def scratch_files(node: hn.Node, vm_uid: str, pool: str = hn.LOCAL_POOL) -> list[str]:
    """The backup job's files of that VM left in the node's pool."""
    virsh(node, "pool-refresh", pool)
    names = virsh(node, "vol-list", pool).split()
    return [v for v in names if v.startswith(vm_uid) and re.search(r"\.backup-[0-9a-f]{8}\.", v)]


DATA = [{"name": "data", "size": "64Mi", "source": {"blank": {}}}]


def empty_bucket(cluster: Cluster, bucket: str) -> None:
    client = s3(cluster)
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=item["Key"])
