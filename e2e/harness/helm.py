"""helm for virtfleet's chart tests, built from the Go module proxy and cached.

No Debian package ships helm. Like kube-apiserver (``harness.controlplane``), it builds
from the pinned module in ``e2e/helm/`` (``go.mod`` + ``go.sum``) and is cached as
``${VIRTFLEET_CACHE:-~/.cache/virtfleet}/bin/helm-<version>-<hash of go.mod+go.sum>``.
The link flags are the ones helm's own Makefile sets, so ``helm version`` tells the
truth and ``.Capabilities.KubeVersion`` is the Kubernetes minor helm was built against
(not helm's fallback 1.20).

Manual use (from ``e2e/``): ``python -m harness.helm`` prints the binary's path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness import nodes
from harness.controlplane import ControlPlaneError, _locked, _module_hash, _tail, cache_dir

MODULE_DIR = Path(__file__).resolve().parent.parent / "helm"
MODULE = "helm.sh/helm/v3"
PACKAGE = "helm.sh/helm/v3/cmd/helm"


class HelmError(ControlPlaneError):
    """helm could not be built or run."""


def pinned_version() -> str:
    text = (MODULE_DIR / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(MODULE)}\s+(v\S+)", text, re.MULTILINE)
    if match is None:
        raise HelmError(f"{MODULE} is not pinned in {MODULE_DIR / 'go.mod'}")
    return match.group(1)


def _k8s_minor() -> tuple[str, str]:
    """Kubernetes major/minor of the client-go helm is built with (v0.32.x → 1, 32)."""
    text = (MODULE_DIR / "go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/client-go\s+v0\.(\d+)\.", text, re.MULTILINE)
    return ("1", match.group(1)) if match else ("1", "32")


def binary_path() -> Path:
    return cache_dir() / "bin" / f"helm-{pinned_version()}-{_module_hash(MODULE_DIR)}"


def _build(target: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise HelmError(f"helm is not cached at {target} and `go` is not on PATH")
    version = pinned_version()
    major, minor = _k8s_minor()
    ldflags = ["-s", "-w", "-X", f"{MODULE}/internal/version.version={version}"]
    for pkg in ("pkg/lint/rules", "pkg/chartutil"):
        ldflags += ["-X", f"{MODULE}/{pkg}.k8sVersionMajor={major}"]
        ldflags += ["-X", f"{MODULE}/{pkg}.k8sVersionMinor={minor}"]
    log = cache_dir() / "logs" / f"build-{target.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    cmd = [go, "build", "-trimpath", "-ldflags", " ".join(ldflags), "-o", str(partial), PACKAGE]
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
    print(f"virtfleet: building helm {version} (log: {log})", file=sys.stderr, flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            cmd, cwd=MODULE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise HelmError(f"building helm failed; last lines of {log}:\n{_tail(log)}")
    partial.replace(target)
    print(
        f"virtfleet: built {target} in {time.monotonic() - started:.0f}s",
        file=sys.stderr,
        flush=True,
    )


def ensure_helm() -> Path:
    """The path of the pinned helm binary, building it on first use (minutes, once)."""
    override = os.environ.get("VIRTFLEET_HELM")
    if override:
        return Path(override)
    with _locked(cache_dir() / "bin" / ".build.lock"):
        target = binary_path()
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _build(target)
    return target


def helm(
    *args: str, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the pinned helm with ``args``; with ``env`` (a ``KUBECONFIG``) against a cluster."""
    result = subprocess.run(
        [str(ensure_helm()), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=None if env is None else dict(env),
    )
    if check and result.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result


CHART = Path(__file__).resolve().parents[2] / "charts" / "virtfleet"
CHART_VALUES = Path(__file__).resolve().parents[2] / "e2e" / "kubelet" / "values.yaml"


def chart_args(every: Sequence[nodes.Node]) -> list[str]:
    """``helm install|upgrade`` arguments for these nodes: the harness values, and each
    node's libvirtd URI as its migration URI (each answers on its own loopback port)."""
    by_node = {node.name: node.uri for node in every}
    return [
        str(CHART), "-f", str(CHART_VALUES),
        "--set-json", f"agent.migrationUriByNode={json.dumps(by_node)}",
    ]  # fmt: skip


def install_chart(env: Mapping[str, str], every: Sequence[nodes.Node]) -> None:
    """``helm upgrade --install virtfleet charts/virtfleet`` on kubelet nodes
    (:mod:`harness.kubelets`), waiting for its pods."""
    helm(
        "upgrade", "--install", "virtfleet", *chart_args(every),
        "--wait", "--timeout", "300s", env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
    )  # fmt: skip


if __name__ == "__main__":
    print(ensure_helm())
