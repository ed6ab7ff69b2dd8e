"""A real, local Kubernetes control plane for virtfleet's end-to-end tests.

The operator must be proven against the real API machinery (RBAC, admission, the
namespace and garbage-collector controllers, ServiceAccount tokens), not a fake. No
distribution package ships kube-apiserver for Debian bookworm and its etcd (3.4.23) is too
old for Kubernetes 1.32, so the three binaries are built from the Go module proxy with
the pinned modules in ``e2e/controlplane/`` and cached under
``${VIRTFLEET_CACHE:-~/.cache/virtfleet}/bin``.

The control plane is etcd + kube-apiserver + kube-controller-manager, all on 127.0.0.1.
There is no kubelet and no scheduler: virtfleet never runs pods, it only needs the API.
Processes run detached (own session) so that ``up`` in one command and ``down`` in
another work; everything lives under ``<state_dir>/controlplane`` and the admin
kubeconfig is ``<state_dir>/kubeconfig``.

Manual use (from ``e2e/``)::

    python -m harness.controlplane build
    eval "$(python -m harness.controlplane up)"
    python -m harness.controlplane down [--wipe]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

GO_MODULES_DIR = Path(__file__).resolve().parent.parent / "controlplane"
"""Directory holding the pinned go.mod files (kube module; etcd in its ``etcd/`` subdir)."""

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
"""No Service traffic is routed on this machine: only the kubelet nodes' own network
namespaces have ``10.96.0.1`` (the ``kubernetes`` Service), forwarded to the apiserver."""

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class _Binary:
    """How to build one control-plane binary from a pinned Go module."""

    name: str
    module_dir: Path
    package: str
    version_module: str
    """The module whose pinned version (read from go.mod) names the binary."""
    ldflags_x: tuple[str, ...] = ()
    """``-X`` assignments; ``{version}`` is substituted."""


_K8S_VERSION_PKG = "k8s.io/component-base/version"
# Without these the apiserver reports v0.0.0-master in /version, which makes kubectl
# print version-skew warnings and hides which Kubernetes the tests really ran against.
_K8S_LDFLAGS_X = (
    f"{_K8S_VERSION_PKG}.gitVersion={{version}}",
    f"{_K8S_VERSION_PKG}.gitMajor={{major}}",
    f"{_K8S_VERSION_PKG}.gitMinor={{minor}}",
    f"{_K8S_VERSION_PKG}.gitTreeState=clean",
)

BINARIES: tuple[_Binary, ...] = (
    _Binary(
        name="etcd",
        module_dir=GO_MODULES_DIR / "etcd",
        package="go.etcd.io/etcd/server/v3",
        version_module="go.etcd.io/etcd/server/v3",
    ),
    _Binary(
        name="kube-apiserver",
        module_dir=GO_MODULES_DIR,
        package="k8s.io/kubernetes/cmd/kube-apiserver",
        version_module="k8s.io/kubernetes",
        ldflags_x=_K8S_LDFLAGS_X,
    ),
    _Binary(
        name="kube-controller-manager",
        module_dir=GO_MODULES_DIR,
        package="k8s.io/kubernetes/cmd/kube-controller-manager",
        version_module="k8s.io/kubernetes",
        ldflags_x=_K8S_LDFLAGS_X,
    ),
)


#: Built only for the kubelet nodes (:mod:`harness.kubelets`), from their own module.
NODE_BINARIES: tuple[_Binary, ...] = tuple(
    _Binary(
        name=name,
        module_dir=GO_MODULES_DIR.parent / "kubelet",
        package=f"k8s.io/kubernetes/cmd/{name}",
        version_module="k8s.io/kubernetes",
        ldflags_x=_K8S_LDFLAGS_X,
    )
    for name in ("kubelet", "kube-scheduler")
)


#: Flux's controllers for the GitOps test (:mod:`harness.flux`), each from its own module
#: (their pins differ; one module would let MVS mix them).
FLUX_BINARIES: tuple[_Binary, ...] = tuple(
    _Binary(
        name=name,
        module_dir=GO_MODULES_DIR.parent / "flux" / name,
        package=f"github.com/fluxcd/{name}",
        version_module=f"github.com/fluxcd/{name}",
        ldflags_x=(),
    )
    for name in ("source-controller", "kustomize-controller")
)


#: Argo CD's multi-call binary (application controller, repo server) for the GitOps test.
ARGOCD_BINARY = _Binary(
    name="argocd",
    module_dir=GO_MODULES_DIR.parent / "argocd",
    package="github.com/argoproj/argo-cd/v3/cmd",
    version_module="github.com/argoproj/argo-cd/v3",
)


#: SeaweedFS's ``weed``: the harness's S3-compatible object store (:mod:`harness.objectstore`).
WEED_BINARY = _Binary(
    name="weed",
    module_dir=GO_MODULES_DIR.parent / "objectstore",
    package="github.com/seaweedfs/seaweedfs/weed",
    version_module="github.com/seaweedfs/seaweedfs",
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or stopped; the message says why."""


@dataclass(frozen=True)
class Ports:
    """Loopback ports; each is overridable so parallel runs or busy machines can coexist."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int

    @classmethod
    def from_env(cls) -> Ports:
        return cls(
            etcd_client=_env_port("VIRTFLEET_ETCD_CLIENT_PORT", 23790),
            etcd_peer=_env_port("VIRTFLEET_ETCD_PEER_PORT", 23800),
            apiserver=_env_port("VIRTFLEET_APISERVER_PORT", 16443),
            controller_manager=_env_port("VIRTFLEET_CONTROLLER_MANAGER_PORT", 16257),
        )


def _env_port(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ControlPlaneError(f"{var}={raw!r} is not a TCP port number")
    return int(raw)


def cache_dir() -> Path:
    """Root of the build cache, ``${VIRTFLEET_CACHE:-~/.cache/virtfleet}``."""
    return Path(os.environ.get("VIRTFLEET_CACHE") or Path.home() / ".cache" / "virtfleet")


# --------------------------------------------------------------------------- build


def pinned_version(module_dir: Path, module: str) -> str:
    gomod = (module_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", gomod, re.MULTILINE)
    if match is None:
        raise ControlPlaneError(f"{module} is not pinned in {module_dir / 'go.mod'}")
    return match.group(1)


def _module_hash(module_dir: Path) -> str:
    """Hash of go.mod and go.sum: any change of a pinned dependency yields a new binary."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((module_dir / name).read_bytes())
    return digest.hexdigest()[:12]


def _binary_path(binary: _Binary) -> Path:
    version = pinned_version(binary.module_dir, binary.version_module)
    name = f"{binary.name}-{version}-{_module_hash(binary.module_dir)}"
    return cache_dir() / "bin" / name


def module_source(binary: _Binary) -> Path:
    """Where the Go module cache holds the source of ``binary``'s pinned module (for the
    files shipped beside a controller, e.g. its CRDs); downloads it if need be."""
    version = pinned_version(binary.module_dir, binary.version_module)
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{binary.version_module}@{version}"],
        cwd=binary.module_dir, capture_output=True, text=True, check=False,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"},
    )  # fmt: skip
    if result.returncode != 0:
        raise ControlPlaneError(
            f"cannot find {binary.version_module}@{version}: {result.stdout}{result.stderr}"
        )
    return Path(json.loads(result.stdout)["Dir"])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _build(binary: _Binary, target: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise ControlPlaneError(
            f"{binary.name} is not cached at {target} and `go` is not on PATH; install Go "
            f"(>= 1.24) or copy a prebuilt binary to that path"
        )
    version = pinned_version(binary.module_dir, binary.version_module)
    major, minor = version.lstrip("v").split(".")[:2]
    ldflags = ["-s", "-w"]
    for assignment in binary.ldflags_x:
        ldflags += ["-X", assignment.format(version=version, major=major, minor=minor)]
    log = cache_dir() / "logs" / f"build-{target.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    cmd = [
        go, "build", "-p", str(os.cpu_count() or 2), "-trimpath",
        "-ldflags", " ".join(ldflags), "-o", str(partial), binary.package,
    ]  # fmt: skip
    env = {
        **os.environ,
        # Never let go.mod's `go` line trigger a toolchain download.
        "GOTOOLCHAIN": "local",
        # Build exactly the pins: fail (naming the missing go.sum line) rather than let go
        # rewrite go.mod/go.sum behind the reviewer's back. Downloads still work.
        "GOFLAGS": "-mod=readonly",
        # Static binaries, as Kubernetes releases them; no C toolchain needed.
        "CGO_ENABLED": "0",
    }
    print(
        f"virtfleet: building {binary.name} {version} from the Go module proxy "
        f"(first build takes several minutes; log: {log})",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + f"\n  (in {binary.module_dir})\n")
        out.flush()
        result = subprocess.run(
            cmd, cwd=binary.module_dir, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ControlPlaneError(
            f"building {binary.name} failed (exit {result.returncode}); last lines of {log}:\n"
            + _tail(log)
        )
    partial.replace(target)
    print(
        f"virtfleet: built {target} in {time.monotonic() - started:.0f}s",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds and start-ups across processes (parallel test sessions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_binaries(binaries: Iterable[_Binary] = BINARIES) -> dict[str, Path]:
    """Return ``{name: path}`` of ``binaries`` (default: etcd, kube-apiserver and
    kube-controller-manager; :data:`NODE_BINARIES` for the kubelet nodes).

    Each binary is cached as ``<cache>/bin/<name>-<version>-<hash of go.mod+go.sum>``, so
    a second call costs nothing and changing a pin rebuilds exactly what it affects.
    Missing binaries are built (minutes on a cold Go cache) with progress on stderr.
    """
    paths: dict[str, Path] = {}
    with _locked(cache_dir() / "bin" / ".build.lock"):
        for binary in binaries:
            target = _binary_path(binary)
            if not target.is_file():
                _build(binary, target)
            paths[binary.name] = target
    return paths


# --------------------------------------------------------------------------- PKI


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{result.stderr.strip()}")


def _issue(pki: Path, name: str, subject: str, extensions: str) -> None:
    """Issue ``<name>.crt``/``<name>.key`` signed by the harness CA (once; reused after)."""
    if (pki / f"{name}.crt").is_file() and (pki / f"{name}.key").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions)
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", str(pki / f"{name}.key"), "-out", str(csr),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
            "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "3650",
            "-extfile", str(ext), "-out", str(pki / f"{name}.crt"),
        )  # fmt: skip


def _ensure_pki(pki: Path) -> None:
    """CA, apiserver serving cert, client certs and the ServiceAccount signing key pair.

    Generated once per state dir: tokens and kubeconfigs handed out earlier stay valid
    across ``down``/``up``.
    """
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    if not (pki / "ca.crt").is_file():
        _openssl(
            "req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-subj", "/CN=virtfleet-e2e-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
        )  # fmt: skip
    leaf = (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _issue(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        leaf + "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local\n",
    )
    client = leaf + "extendedKeyUsage=clientAuth\n"
    _issue(pki, "admin", "/O=system:masters/CN=virtfleet-e2e-admin", client)
    # The controller manager gets its own least-privilege identity, bound by the default
    # RBAC bootstrap policy, as in a real cluster.
    _issue(pki, "controller-manager", "/CN=system:kube-controller-manager", client)
    if not (pki / "sa.key").is_file():
        _openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", str(pki / "sa.key"),
        )  # fmt: skip
        _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


# --------------------------------------------------------------------------- kubeconfig


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str]) -> Path:
    """Write a single-context kubeconfig with everything embedded (safe to copy around)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "virtfleet-e2e",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca)},
            }
        ],
        "users": [{"name": "virtfleet-e2e", "user": user}],
        "contexts": [
            {
                "name": "virtfleet-e2e",
                "context": {"cluster": "virtfleet-e2e", "user": "virtfleet-e2e"},
            }
        ],
        "current-context": "virtfleet-e2e",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump(config, out, sort_keys=False)
    return path


def _cert_kubeconfig(path: Path, server: str, pki: Path, name: str) -> Path:
    user = {
        "client-certificate-data": _b64(pki / f"{name}.crt"),
        "client-key-data": _b64(pki / f"{name}.key"),
    }
    return _write_kubeconfig(path, server, pki / "ca.crt", user)


def issue_client_cert(pki: Path, name: str, subject: str) -> None:
    """A client certificate ``<name>.crt`` for ``subject`` from the harness CA (once)."""
    _issue(
        pki,
        name,
        subject,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,"
        "keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )


def cert_kubeconfig(path: Path, server: str, pki: Path, name: str) -> Path:
    """A kubeconfig authenticating with the client certificate ``<name>.crt``."""
    return _cert_kubeconfig(path, server, pki, name)


def kubeconfig_for_token(path: Path, server: str, ca: Path, token: str) -> Path:
    """Write a kubeconfig authenticating with a bearer ``token`` (e.g. a ServiceAccount's).

    Lets tests run the operator, or kubectl, with exactly the RBAC the chart grants it
    instead of the admin's ``system:masters`` rights, which would hide missing rules.
    Returns ``path``.
    """
    return _write_kubeconfig(path, server, ca, {"token": token})


def _kubectl() -> str:
    kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if kubectl is None:
        raise ControlPlaneError("kubectl is not on PATH (or set KUBECTL to its path)")
    return kubectl


def mint_token(kubeconfig: Path, namespace: str, serviceaccount: str, duration: str = "1h") -> str:
    """Mint a bound token for ``namespace/serviceaccount`` via the TokenRequest API.

    Uses ``kubectl create token`` (what a person would run) so the test exercises the
    apiserver's signing key and issuer configuration end to end.
    """
    result = subprocess.run(
        [
            _kubectl(), "--kubeconfig", str(kubeconfig), "-n", namespace,
            "create", "token", serviceaccount, "--duration", duration,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise ControlPlaneError(
            f"minting a token for {namespace}/{serviceaccount} failed: {result.stderr.strip()}"
        )
    return result.stdout.strip()


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Layout:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "controlplane" / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.root / "controlplane" / "etcd"

    @property
    def logs(self) -> Path:
        return self.root / "controlplane" / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "controlplane" / "pids"

    @property
    def kubeconfigs(self) -> Path:
        return self.root / "controlplane" / "kubeconfigs"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "kubeconfig"


_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
"""Start order; stopped in reverse."""

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Processes started by this Python process, kept so they are reaped (no zombies, no
ResourceWarning) when ``down`` runs in the same process as ``up``."""


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid: int, name: str) -> bool:
    """True if ``pid`` is a live (non-zombie) process of component ``name``.

    A process this Python process started is asked directly (which also reaps it). For
    any other pid the command line is checked, which guards against a pid recycled after
    a reboot or crash: ``down`` must never signal an unrelated process. (A freshly
    exec'd process briefly shows an empty command line, so that check cannot be used
    for our own children.)
    """
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        return False
    return Path(os.fsdecode(cmdline[0])).name.startswith(name)


def _running_pid(layout: _Layout, name: str) -> int | None:
    pid = _read_pid(layout.pids / f"{name}.pid")
    return pid if pid is not None and _running(pid, name) else None


def _check_port_free(port: int, name: str, var: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the Go servers set: a port in TIME_WAIT is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise ControlPlaneError(
                f"cannot start {name}: 127.0.0.1:{port} is in use ({err.strerror}). Find the "
                f"owner with `ss -ltnp 'sport = :{port}'`, stop it (a control plane left from "
                f"another state dir: `python -m harness.controlplane down --state-dir ...`), "
                f"or choose another port with {var}=..."
            ) from err


def _start(layout: _Layout, name: str, argv: list[str]) -> None:
    """Start ``argv`` detached in its own session, logging to ``logs/<name>.log``."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with (layout.logs / f"{name}.log").open("ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    (layout.pids / f"{name}.pid").write_text(f"{proc.pid}\n")


def _admin_tls(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return context


def _loopback_tls_unverified() -> ssl.SSLContext:
    """For kube-controller-manager's /healthz: it serves a self-signed cert of its own, and
    the probe only needs to know the process is up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _probe(url: str, context: ssl.SSLContext | None) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            body = response.read().decode(errors="replace")
            return response.status == 200, body
    except urllib.error.HTTPError as err:
        return False, err.read().decode(errors="replace")
    except (OSError, ssl.SSLError) as err:
        return False, str(err)


def _wait_ready(layout: _Layout, name: str, url: str, context: ssl.SSLContext | None) -> None:
    """Poll ``url`` until it answers 200, failing fast (with the log) if ``name`` dies."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        ok, last = _probe(url, context)
        if ok:
            return
        if _running_pid(layout, name) is None:
            raise ControlPlaneError(
                f"{name} exited during start-up; last lines of {layout.logs / (name + '.log')}:\n"
                + _tail(layout.logs / f"{name}.log")
            )
        time.sleep(0.25)
    raise ControlPlaneError(
        f"{name} not ready after {READY_TIMEOUT_S:.0f}s at {url}; last answer: {last.strip()}\n"
        f"last lines of {layout.logs / (name + '.log')}:\n" + _tail(layout.logs / f"{name}.log")
    )


def _argv(
    name: str, binary: Path, layout: _Layout, ports: Ports, kcm_kubeconfig: Path
) -> list[str]:
    pki = layout.pki
    if name == "etcd":
        client = f"http://127.0.0.1:{ports.etcd_client}"
        peer = f"http://127.0.0.1:{ports.etcd_peer}"
        return [
            str(binary),
            "--name=virtfleet-e2e",
            f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=virtfleet-e2e={peer}",
            # Throw-away test data: no fsync keeps API writes fast on virtual disks. A
            # host crash may corrupt it; `down(wipe=True)` starts over.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
    if name == "kube-apiserver":
        return [
            str(binary),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # Defaults already include these; listed because the tests rely on them.
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount",
            # The "kubernetes" Endpoints would point at 127.0.0.1, which Endpoints
            # validation rejects; nothing here routes to it anyway.
            "--endpoint-reconciler-type=none",
            # Reach kubelets by the InternalIP the harness gives each Node (loopback),
            # never by resolving a Node's hostname: that lookup would leave the machine.
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            # /debug/pprof for profiling the apiserver under a benchmark's load.
            f"--profiling={'true' if os.environ.get('VIRTFLEET_APISERVER_PROFILING') else 'false'}",
        ]
    return [
        str(binary),
        f"--kubeconfig={kcm_kubeconfig}",
        f"--authentication-kubeconfig={kcm_kubeconfig}",
        f"--authorization-kubeconfig={kcm_kubeconfig}",
        # Trust our CA directly instead of looking up the front-proxy (requestheader) CA
        # in the cluster: there is none, and the lookup logs an error every few seconds.
        "--authentication-skip-lookup=true",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.controller_manager}",
        f"--cert-dir={pki / 'controller-manager-serving'}",
        "--leader-elect=false",
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        # Otherwise it creates /usr/libexec/kubernetes/... on the host.
        f"--flex-volume-plugin-dir={layout.root / 'controlplane' / 'flexvolume'}",
        "--profiling=false",
    ]


@dataclass(frozen=True)
class _Health:
    """Where a component listens and how to ask whether it is ready."""

    ports: dict[str, int]
    """Environment variable overriding the port -> port."""
    url: str
    tls: ssl.SSLContext | None


def _health(name: str, ports: Ports, pki: Path) -> _Health:
    if name == "etcd":
        return _Health(
            {
                "VIRTFLEET_ETCD_CLIENT_PORT": ports.etcd_client,
                "VIRTFLEET_ETCD_PEER_PORT": ports.etcd_peer,
            },
            f"http://127.0.0.1:{ports.etcd_client}/health",
            None,
        )
    if name == "kube-apiserver":
        return _Health(
            {"VIRTFLEET_APISERVER_PORT": ports.apiserver},
            f"https://127.0.0.1:{ports.apiserver}/readyz",
            _admin_tls(pki),
        )
    return _Health(
        {"VIRTFLEET_CONTROLLER_MANAGER_PORT": ports.controller_manager},
        f"https://127.0.0.1:{ports.controller_manager}/healthz",
        _loopback_tls_unverified(),
    )


def up(state_dir: Path) -> dict[str, str]:
    """Start (or find running) etcd, kube-apiserver and kube-controller-manager.

    Idempotent: components already running for this ``state_dir`` are kept, missing ones
    are started, and the call returns once the apiserver's ``/readyz`` and the controller
    manager's ``/healthz`` answer ok. If start-up fails, what this call started is stopped
    again (no stray processes holding the ports) and the error carries the log tail.
    Returns the environment a test or the operator needs: ``KUBECONFIG`` (admin,
    ``system:masters``) and ``KUBE_APISERVER``.
    """
    state_dir = state_dir.resolve()
    layout = _Layout(state_dir)
    ports = Ports.from_env()
    binaries = ensure_binaries()
    server = f"https://127.0.0.1:{ports.apiserver}"
    with _locked(state_dir / "controlplane" / ".lock"):
        _ensure_pki(layout.pki)
        admin = _cert_kubeconfig(layout.admin_kubeconfig, server, layout.pki, "admin")
        kcm_kubeconfig = _cert_kubeconfig(
            layout.kubeconfigs / "controller-manager.yaml", server, layout.pki, "controller-manager"
        )
        started: list[str] = []
        try:
            for name in _COMPONENTS:
                health = _health(name, ports, layout.pki)
                if _running_pid(layout, name) is None:
                    for var, port in health.ports.items():
                        _check_port_free(port, name, var)
                    argv = _argv(name, binaries[name], layout, ports, kcm_kubeconfig)
                    _start(layout, name, argv)
                    started.append(name)
                _wait_ready(layout, name, health.url, health.tls)
        except BaseException:
            _stop_components(layout, reversed(started))
            raise
    return {"KUBECONFIG": str(admin), "KUBE_APISERVER": server}


def _stop(pid: int, name: str) -> None:
    """SIGTERM the component's process group, then SIGKILL it after STOP_TIMEOUT_S."""
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(pid, name):
                return
            time.sleep(0.1)
    raise ControlPlaneError(f"{name} (pid {pid}) survived SIGKILL; check `ps -o stat -p {pid}`")


def _stop_components(layout: _Layout, names: Iterable[str]) -> None:
    for name in names:
        pidfile = layout.pids / f"{name}.pid"
        pid = _read_pid(pidfile)
        if pid is not None and _running(pid, name):
            _stop(pid, name)
        pidfile.unlink(missing_ok=True)


def down(state_dir: Path, wipe: bool = False) -> None:
    """Stop every component of the control plane in ``state_dir``; idempotent.

    ``wipe=True`` also deletes the etcd data so the next ``up`` starts from an empty
    cluster (the PKI is kept, so the CA other components trust does not change).
    """
    layout = _Layout(state_dir.resolve())
    _stop_components(layout, reversed(_COMPONENTS))
    if wipe:
        shutil.rmtree(layout.etcd_data, ignore_errors=True)


def kill_apiserver(state_dir: Path, sig: int = signal.SIGKILL) -> int | None:
    """Crash the kube-apiserver alone (etcd and the controller manager keep running).

    Chaos and watch-health tests use it to prove clients survive an apiserver restart;
    :func:`start_apiserver` (or ``up``) brings it back. Returns the killed pid, if any.
    """
    layout = _Layout(state_dir.resolve())
    pid = _running_pid(layout, "kube-apiserver")
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _running(pid, "kube-apiserver") and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def start_apiserver(state_dir: Path) -> None:
    """Start the kube-apiserver again (after :func:`kill_apiserver`) and wait for /readyz."""
    layout = _Layout(state_dir.resolve())
    ports = Ports.from_env()
    with _locked(state_dir.resolve() / "controlplane" / ".lock"):
        health = _health("kube-apiserver", ports, layout.pki)
        if _running_pid(layout, "kube-apiserver") is None:
            binary = ensure_binaries()["kube-apiserver"]
            kcm = layout.kubeconfigs / "controller-manager.yaml"
            _start(layout, "kube-apiserver", _argv("kube-apiserver", binary, layout, ports, kcm))
        _wait_ready(layout, "kube-apiserver", health.url, health.tls)


def ca_file(state_dir: Path) -> Path:
    """The CA that signs the apiserver's serving cert (for ``kubeconfig_for_token``)."""
    return _Layout(state_dir.resolve()).pki / "ca.crt"


def pids(state_dir: Path) -> dict[str, int]:
    """``{component: pid}`` of the components currently running for ``state_dir``."""
    layout = _Layout(state_dir.resolve())
    running = {name: _running_pid(layout, name) for name in _COMPONENTS}
    return {name: pid for name, pid in running.items() if pid is not None}


# --------------------------------------------------------------------------- CLI


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.controlplane", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=("build", "up", "down"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("VIRTFLEET_STATE_DIR") or cache_dir() / "state"),
        help="where certs, etcd data, logs and the kubeconfig live "
        "(default: $VIRTFLEET_STATE_DIR or <cache>/state)",
    )
    parser.add_argument("--wipe", action="store_true", help="down: also delete the etcd data")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            for name, path in ensure_binaries().items():
                print(f"{name}\t{path}")
        elif args.command == "up":
            for key, value in up(args.state_dir).items():
                print(f"export {key}={shlex.quote(value)}")
        else:
            down(args.state_dir, wipe=args.wipe)
    except ControlPlaneError as err:
        print(f"virtfleet: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
