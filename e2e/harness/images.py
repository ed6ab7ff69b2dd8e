"""The images of the kubelet nodes, made here and imported, never pulled.

The sandbox image ``registry.k8s.io/pause`` is built from the Kubernetes module's own
``build/pause/linux/pause.c`` (static, with gcc) and ``localhost/virtfleet:dev`` from the
repository's Dockerfile by ``scripts/build-image``; both are OCI archives in the build
cache, imported into a node's containerd with ``ctr images import``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from harness import controlplane, nodes

REPO = Path(__file__).resolve().parents[2]
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
VIRTFLEET_IMAGE = "localhost/virtfleet:dev"
#: The containerd namespace the CRI plugin (the kubelet's image store) uses.
K8S_NAMESPACE = "k8s.io"


def containerd_socket(node: nodes.Node) -> Path:
    """containerd's socket as the machine sees it (``/run`` of the node is ``N/run``)."""
    return node.root / "run" / "containerd" / "containerd.sock"


def _cache() -> Path:
    path = controlplane.cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pause_archive() -> Path:
    """The sandbox image as an OCI archive, built once per ``pause.c``."""
    module = controlplane.NODE_BINARIES[0].module_dir
    listed = subprocess.run(
        ["go", "mod", "download", "-json", "k8s.io/kubernetes"],
        cwd=module,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"},
    )
    source = Path(json.loads(listed.stdout)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    archive = _cache() / f"pause-{digest}.tar"
    if archive.is_file():
        return archive
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            ["gcc", "-static", "-O2", "-DVERSION=3.10", "-o", str(work / "pause"), str(source)],
            check=True,
        )
        (work / "Containerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
        )
        subprocess.run(
            ["buildah", "bud", "-q", "--format=oci", "-t", PAUSE_IMAGE, str(work)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        partial = archive.with_name(f".{archive.name}.partial")
        subprocess.run(
            ["buildah", "push", "-q", PAUSE_IMAGE, f"oci-archive:{partial}:{PAUSE_IMAGE}"],
            check=True,
        )
        partial.replace(archive)
    return archive


def virtfleet_archive() -> Path:
    """``scripts/build-image`` (content-cached by buildah) written as an OCI archive."""
    archive = _cache() / "virtfleet-dev.tar"
    subprocess.run(
        [str(REPO / "scripts" / "build-image"), VIRTFLEET_IMAGE],
        check=True,
        env={**os.environ, "VIRTFLEET_IMAGE_ARCHIVE": str(archive)},
    )
    return archive


def _ctr(node: nodes.Node, *args: str) -> str:
    return subprocess.run(
        ["ctr", "--address", str(containerd_socket(node)), "-n", K8S_NAMESPACE, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def import_image(node: nodes.Node, archive: Path) -> None:
    """Into the node's containerd (``ctr images import``), the kubelet's image store."""
    _ctr(node, "images", "import", str(archive))
