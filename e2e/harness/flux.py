"""Flux (source-controller + kustomize-controller) for the GitOps tests.

The controllers are Flux's own v1.7.3 releases built from the Go module proxy
(:data:`controlplane.FLUX_BINARIES`, cached like kube-apiserver), run as processes on the
host with the admin kubeconfig: Flux's own install binds kustomize-controller to
cluster-admin, so the rights are the same. Their CRDs are read from the same modules.
Nothing listens beyond 127.0.0.1:

- source-controller's artifact server: ``<VIRTFLEET_FLUX_PORT, 29080> + 1``; its
  health/metrics: + 2/+ 3
- kustomize-controller's health/metrics: + 4/+ 5
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from harness import controlplane, pidfiles
from harness.kube import install_crds, kubectl

NAMESPACE = "flux-system"


def base_port() -> int:
    return int(os.environ.get("VIRTFLEET_FLUX_PORT", "29080"))


def crd_files() -> list[Path]:
    """Flux's CRDs for the two controllers, from their modules' ``config/crd/bases``."""
    return [
        path
        for binary in controlplane.FLUX_BINARIES
        for path in (controlplane.module_source(binary) / "config" / "crd" / "bases").glob("*.yaml")
    ]


def _dir(state_dir: Path) -> Path:
    return state_dir / "flux"


def up(state_dir: Path, env: Mapping[str, str]) -> None:
    """Install Flux's CRDs and start both controllers (idempotent)."""
    binaries = controlplane.ensure_binaries(controlplane.FLUX_BINARIES)
    install_crds(env, crd_files())
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    kubectl(env, "apply", "-f", "-", input=json.dumps(namespace))

    base = _dir(state_dir)
    port = base_port()
    storage = base / "artifacts"
    storage.mkdir(parents=True, exist_ok=True)
    common = [
        "--enable-leader-election=false", "--watch-all-namespaces=true",
        "--log-encoding=json", "--log-level=debug",
    ]  # fmt: skip
    argvs = {
        "source-controller": [
            str(binaries["source-controller"]), *common,
            f"--storage-path={storage}",
            f"--storage-addr=127.0.0.1:{port + 1}",
            f"--storage-adv-addr=127.0.0.1:{port + 1}",
            f"--health-addr=127.0.0.1:{port + 2}",
            f"--metrics-addr=127.0.0.1:{port + 3}",
        ],
        "kustomize-controller": [
            str(binaries["kustomize-controller"]), *common,
            f"--health-addr=127.0.0.1:{port + 4}",
            f"--metrics-addr=127.0.0.1:{port + 5}",
        ],
    }  # fmt: skip
    health = {"source-controller": port + 2, "kustomize-controller": port + 4}
    process_env = {**os.environ, "KUBECONFIG": env["KUBECONFIG"], "RUNTIME_NAMESPACE": NAMESPACE}
    for name, argv in argvs.items():
        pidfile, log = base / f"{name}.pid", log_path(state_dir, name)
        if pidfiles.running(pidfile) is None:
            pidfiles.spawn(pidfile, log, argv, marker=argv[0], env=process_env)
        pidfiles.wait_answering(pidfile, f"http://127.0.0.1:{health[name]}/readyz", log)


def log_path(state_dir: Path, name: str) -> Path:
    return _dir(state_dir) / f"{name}.log"


def down(state_dir: Path) -> None:
    """Stop both controllers (their objects and CRDs stay, like an uninstalled Flux's)."""
    for binary in controlplane.FLUX_BINARIES:
        pidfiles.stop(_dir(state_dir) / f"{binary.name}.pid")
