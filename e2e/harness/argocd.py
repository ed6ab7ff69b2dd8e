"""Argo CD (application controller + repo server) for the GitOps tests.

Argo CD's own v3.2.11 multi-call binary (:data:`controlplane.ARGOCD_BINARY`, built from
``e2e/argocd/go.mod`` and cached like kube-apiserver; newer releases replace a module
with a local directory the Go module proxy cannot serve), run as processes on the host:

- Debian's ``redis-server`` on ``127.0.0.1:<VIRTFLEET_ARGOCD_PORT, 29180>`` (Argo CD's
  cache; nothing persisted);
- ``argocd-repo-server`` on port + 1 (plain gRPC on loopback; GnuPG off), metrics + 2;
- ``argocd-application-controller`` (metrics + 3), with the admin kubeconfig standing
  in for its in-cluster identity (``ARGOCD_FAKE_IN_CLUSTER``, Argo CD's own switch for
  running outside a pod): the ``in-cluster`` destination is this cluster.

Its CRDs come from the same module; ``argocd-cm`` carries virtfleet's Lua health checks
as shipped in ``gitops/argocd/argocd-cm-patch.yaml``. No API server, UI or Dex: the
tests read the Application objects, as ``kubectl``/Argo CD's CLI would show them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from harness import controlplane, pidfiles
from harness.kube import install_crds, kubectl

NAMESPACE = "argocd"
REPO = Path(__file__).resolve().parents[2]
HEALTH_PATCH = REPO / "gitops" / "argocd" / "argocd-cm-patch.yaml"
_PART_OF = {"app.kubernetes.io/part-of": "argocd"}


class ArgoCDError(RuntimeError):
    """Argo CD could not be started; the message says why."""


def base_port() -> int:
    return int(os.environ.get("VIRTFLEET_ARGOCD_PORT", "29180"))


def _dir(state_dir: Path) -> Path:
    return state_dir / "argocd"


def log_path(state_dir: Path, name: str) -> Path:
    return _dir(state_dir) / f"{name}.log"


def crd_files() -> list[Path]:
    crds = controlplane.module_source(controlplane.ARGOCD_BINARY) / "manifests" / "crds"
    return [crds / f"{kind}-crd.yaml" for kind in ("application", "appproject")]


def _objects() -> list[dict[str, Any]]:
    """What an Argo CD install puts beside the controller: its settings, and the
    ``default`` project (which argocd-server would create; there is none here)."""
    health = yaml.safe_load(HEALTH_PATCH.read_text())
    settings = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": NAMESPACE, "labels": _PART_OF},
        "data": {**health["data"], "timeout.reconciliation": "10s"},
    }  # fmt: skip
    secret = {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "argocd-secret", "namespace": NAMESPACE, "labels": _PART_OF},
        "stringData": {"server.secretkey": secrets.token_urlsafe(32)},
    }  # fmt: skip
    project = {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
        "metadata": {"name": "default", "namespace": NAMESPACE},
        "spec": {
            "sourceRepos": ["*"],
            "destinations": [{"server": "*", "namespace": "*"}],
            "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
        },
    }  # fmt: skip
    return [settings, secret, project]


def up(state_dir: Path, env: Mapping[str, str]) -> None:
    """Install Argo CD's CRDs and settings and start its processes (idempotent)."""
    redis = shutil.which("redis-server")
    if redis is None:
        raise ArgoCDError("redis-server is not installed (scripts/bootstrap installs it)")
    binary = controlplane.ensure_binaries([controlplane.ARGOCD_BINARY])["argocd"]
    install_crds(env, crd_files())
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    kubectl(env, "apply", "-f", "-", input=json.dumps(namespace))
    for obj in _objects():
        secret = obj["kind"] == "Secret"
        if secret and kubectl(env, "get", "secret", "-n", NAMESPACE, obj["metadata"]["name"],
                              check=False).returncode == 0:  # fmt: skip
            continue  # keep the key of an earlier start
        kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", "-",
                input=json.dumps(obj))  # fmt: skip

    base, port = _dir(state_dir), base_port()
    home = base / "home"
    for sub in ("home", "tmp", "tls", "ssh"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    process_env = {
        **os.environ,
        "KUBECONFIG": env["KUBECONFIG"],
        "ARGOCD_FAKE_IN_CLUSTER": "true",
        "ARGOCD_GPG_ENABLED": "false",
        "ARGOCD_TLS_DATA_PATH": str(base / "tls"),
        "ARGOCD_SSH_DATA_PATH": str(base / "ssh"),
        "HOME": str(home),
        "TMPDIR": str(base / "tmp"),
    }
    redis_addr = f"127.0.0.1:{port}"
    argvs = {
        "redis": [redis, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                  "--appendonly", "no", "--dir", str(base)],
        "repo-server": [
            str(binary), "--address", "127.0.0.1", "--port", str(port + 1),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(port + 2),
            "--disable-tls", "--redis", redis_addr, "--logformat", "json",
        ],
        "application-controller": [
            str(binary), "--namespace", NAMESPACE, "--kubeconfig", env["KUBECONFIG"],
            "--repo-server", f"127.0.0.1:{port + 1}", "--repo-server-plaintext",
            "--redis", redis_addr, "--metrics-port", str(port + 3),
            "--status-processors", "4", "--operation-processors", "2",
            "--app-resync", "10", "--self-heal-timeout-seconds", "2", "--logformat", "json",
            # Argo CD 3 keeps each resource's health in its cache only (the UI and CLI read
            # it there); the tests read the Application object, so it is kept there too.
            "--persist-resource-health",
        ],
    }  # fmt: skip
    for name, argv in argvs.items():
        pidfile = base / f"{name}.pid"
        if pidfiles.running(pidfile) is None:
            # One binary, the component chosen by name (redis ignores it). The marker is
            # the program's name: redis-server rewrites its command line to
            # "redis-server <address>".
            component_env = {**process_env, "ARGOCD_BINARY_NAME": f"argocd-{name}"}
            marker = Path(argv[0]).name
            pidfiles.spawn(pidfile, log_path(state_dir, name), argv, marker, env=component_env)
    checks = {
        "repo-server": f"http://127.0.0.1:{port + 2}/metrics",
        "application-controller": f"http://127.0.0.1:{port + 3}/healthz",
    }
    for name, url in checks.items():
        pidfiles.wait_answering(base / f"{name}.pid", url, log_path(state_dir, name))


def down(state_dir: Path) -> None:
    """Stop Argo CD's processes (its objects and CRDs stay)."""
    for name in ("application-controller", "repo-server", "redis"):
        pidfiles.stop(_dir(state_dir) / f"{name}.pid")
