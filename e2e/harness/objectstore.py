"""An S3-compatible object store on loopback: SeaweedFS's ``weed server -s3``.

Where backups go in the tests and the demo. ``weed`` (SeaweedFS, Apache-2.0) is built from
``e2e/objectstore/go.mod`` and cached like kube-apiserver (:data:`controlplane.WEED_BINARY`);
one process runs its master, a volume server, a filer and the S3 gateway, every port on
127.0.0.1 (``<VIRTFLEET_OBJECTSTORE_PORT, 29300>`` + 0..7: master, volume, filer and S3,
each HTTP then gRPC; S3 is + 6), its telemetry off (nothing leaves the machine).

One identity, ``virtfleet``, with a secret key made once per state dir; ``up`` returns
``VIRTFLEET_S3_ENDPOINT``, ``VIRTFLEET_S3_ACCESS_KEY`` and ``VIRTFLEET_S3_SECRET_KEY``.
The data lives in ``<state>/objectstore/data``: ``down`` keeps it unless asked to wipe
it, so a wiped cluster can be rebuilt against the same bucket (disaster recovery).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from harness import controlplane, pidfiles

ACCESS_KEY = "virtfleet"


def base_port() -> int:
    return int(os.environ.get("VIRTFLEET_OBJECTSTORE_PORT", "29300"))


def _dir(state_dir: Path) -> Path:
    return state_dir / "objectstore"


def log_path(state_dir: Path) -> Path:
    return _dir(state_dir) / "weed.log"


def _secret(base: Path) -> str:
    """The identity's secret key, made once and kept with the data it guards."""
    path = base / "secret-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(30))
        path.chmod(0o600)
    return path.read_text().strip()


def _s3_config(base: Path, secret: str) -> Path:
    config = {
        "identities": [
            {
                "name": ACCESS_KEY,
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = base / "s3.json"
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


def endpoint(port: int | None = None) -> str:
    return f"http://127.0.0.1:{(base_port() if port is None else port) + 6}"


def up(state_dir: Path) -> dict[str, str]:
    """Start the store (idempotent); return how to reach it."""
    weed = controlplane.ensure_binaries([controlplane.WEED_BINARY])["weed"]
    base, port = _dir(state_dir), base_port()
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    secret = _secret(base)
    argv = [
        str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        # Every bucket is a collection that grows 7 volumes at once; with slots counted
        # from the free disk (volume.max=0, 1 GiB volumes) a few dozen test buckets used
        # them all ("No writable volumes and no free volumes left"). Volumes are sparse
        # files: many small slots cost nothing.
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=2000",
        f"-master.port={port}", f"-master.port.grpc={port + 1}",
        f"-volume.port={port + 2}", f"-volume.port.grpc={port + 3}",
        "-filer", f"-filer.port={port + 4}", f"-filer.port.grpc={port + 5}",
        f"-filer.localSocket={base / 'filer.sock'}",
        "-s3", f"-s3.port={port + 6}", f"-s3.port.grpc={port + 7}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={base / 's3.sock'}",
        f"-s3.config={_s3_config(base, secret)}",
    ]  # fmt: skip
    pidfile = base / "weed.pid"
    if pidfiles.running(pidfile) is None:
        pidfiles.spawn(pidfile, log_path(state_dir), argv, marker=f"-dir={data}")
    # The S3 gateway answers its health check once the filer behind it does.
    pidfiles.wait_answering(pidfile, f"{endpoint(port)}/healthz", log_path(state_dir), 120)
    return {
        "VIRTFLEET_S3_ENDPOINT": endpoint(port),
        "VIRTFLEET_S3_ACCESS_KEY": ACCESS_KEY,
        "VIRTFLEET_S3_SECRET_KEY": secret,
    }


def down(state_dir: Path, *, wipe: bool = False) -> None:
    """Stop the store; ``wipe`` also deletes every bucket and the credentials."""
    pidfiles.stop(_dir(state_dir) / "weed.pid")
    if wipe:
        shutil.rmtree(_dir(state_dir), ignore_errors=True)
