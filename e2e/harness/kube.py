"""kubectl against a harness cluster: what every harness module that talks to it uses."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml


def kubectl(
    env: Mapping[str, str], *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the machine's kubectl against this cluster (admin unless env says otherwise)."""
    result = subprocess.run(
        ["kubectl", *args],
        input=input,
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        timeout=120,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {shlex.join(args)} failed:\n{result.stderr.strip()}")
    return result


def wait_established(env: Mapping[str, str], *crds: str, timeout: float = 60.0) -> None:
    """Wait until each CRD serves its kind. ``kubectl wait`` alone fails on a CRD that
    has no status yet (right after it is created), so it is retried."""
    deadline = time.monotonic() + timeout
    args = ("wait", "--for=condition=Established", "--timeout=10s", *(f"crd/{c}" for c in crds))
    while (result := kubectl(env, *args, check=False)).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"CRDs {', '.join(crds)} not established: {result.stderr}")
        time.sleep(0.5)


def install_crds(env: Mapping[str, str], files: Iterable[Path]) -> None:
    """Apply the CRDs in ``files`` server-side and wait until each is Established."""
    paths = sorted(files)
    kubectl(env, "apply", "--server-side", "--force-conflicts",
            *(arg for path in paths for arg in ("-f", str(path))))  # fmt: skip
    names = [
        doc["metadata"]["name"]
        for path in paths
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    wait_established(env, *names)
