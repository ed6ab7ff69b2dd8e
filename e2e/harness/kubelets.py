"""Kubelet nodes: each harness node also a real Kubernetes node, whose kubelet runs pods.

Why: the Helm chart's DaemonSet and Deployment must run as real pods (Pod Security
admission, probes, ServiceAccount tokens, hostPath mounts of the node's libvirtd socket),
not as plain processes. Per node (``N`` = ``state_dir/nodes/<name>``):

- the node's network namespace (:mod:`harness.underlay`, with its libvirtd): containerd,
  the kubelet and every pod of the node live there, hostNetwork pods included. Pods get
  a CNI bridge (Debian's containernetworking-plugins) with ``10.244.0.0/24`` inside it;
  the namespace has no route off the machine. The node's forwarder brings the apiserver
  in at ``127.0.0.1:<apiserver port>`` and at the ``kubernetes`` Service address
  ``10.96.0.1:443``; the other nodes' libvirtds answer on their underlay addresses;
- containerd (Debian's, with runc) and the kubelet run in the node's mount namespace too,
  so a hostPath ``/var/run/libvirt`` is that node's libvirtd socket directory, as the
  chart mounts it; cgroups under ``/virtfleet-<tag>-<name>`` (cgroupfs, cgroup v1);
- images are imported, never pulled: the sandbox image ``registry.k8s.io/pause`` built
  from the Kubernetes module's own ``pause.c``, and ``localhost/virtfleet:dev`` from
  ``scripts/build-image``.

One kube-scheduler serves both. kubelet and kube-scheduler are built from
``e2e/kubelet/go.mod`` and cached like the control plane's binaries.

Not here yet: the apiserver cannot reach the kubelets (``kubectl logs``/``exec``): read
container logs under ``/var/log/pods`` (:func:`pod_log`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

from harness import controlplane, images, netns, nodes, pidfiles
from harness.images import import_image, pause_archive, virtfleet_archive

POD_SUBNET = "10.244.0.0/24"
KUBELET_PORT_BASE = 16250
READY_TIMEOUT_S = 120.0


class KubeletError(RuntimeError):
    """A kubelet node could not be started; the message carries the log tail."""


def _system_tag(node: nodes.Node) -> str:
    """Tells the kubelet nodes of two systems on this machine apart (their state dirs)."""
    return hashlib.sha256(str(node.root.resolve()).encode()).hexdigest()[:6]


def netns_name(node: nodes.Node) -> str:
    """The node's network namespace (made by :mod:`harness.underlay` with the node)."""
    assert node.netns is not None, f"{node.name} has no network namespace"
    return node.netns


def cgroup_name(node: nodes.Node) -> str:
    return f"virtfleet-{_system_tag(node)}-{node.name}"


def _dir(node: nodes.Node) -> Path:
    return node.root / "k8s"


def _supervisor(node: nodes.Node) -> int:
    pid = (node.root / "run" / "supervisor.pid").read_text().strip()
    return int(pid)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- configs


def _containerd_config(node: nodes.Node) -> Path:
    base = _dir(node)
    (base / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
    bridge = {
        "cniVersion": "1.0.0",
        "name": "virtfleet-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "vfpods0",
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(base / "cni" / "ipam"),
                },
            }
        ],
    }
    (base / "cni" / "net.d" / "10-pods.conflist").write_text(json.dumps(bridge, indent=1))
    config = base / "containerd.toml"
    config.write_text(
        f"""version = 2
root = "{base / "containerd"}"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # The sandbox this runs in refuses lowering oom_score_adj (runc's child dies with
  # "can't get final child's PID from pipe"): containerd clamps it to its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base / "cni" / "net.d"}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"""
    )
    return config


def kubelet_port(index: int) -> int:
    return KUBELET_PORT_BASE + index


def _kubelet_config(node: nodes.Node, index: int, pki: Path) -> Path:
    base = _dir(node)
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "port": kubelet_port(index),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cgroup_name(node)}",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        # The machine's disk is not known to cAdvisor here: no disk-based eviction.
        "evictionHard": {"memory.available": "100Mi"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "makeIPTablesUtilChains": False,
        "localStorageCapacityIsolation": False,
        "protectKernelDefaults": False,
        # No resolver for pods: nothing they do may leave the machine.
        "resolvConf": "",
        "clusterDomain": "cluster.local",
    }
    path = base / "kubelet.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


def _cgroups(node: nodes.Node) -> None:
    """The node's cgroup root in every v1 hierarchy (cpuset needs its cpus/mems set)."""
    root = Path("/sys/fs/cgroup")
    for hierarchy in root.iterdir():
        if hierarchy.is_dir() and (hierarchy / "cgroup.procs").exists():
            (hierarchy / cgroup_name(node)).mkdir(exist_ok=True)
    cpuset = root / "cpuset" / cgroup_name(node)
    if cpuset.is_dir():
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (cpuset / name).read_text().strip():
                (cpuset / name).write_text((root / "cpuset" / name).read_text())


# ---------------------------------------------------------------------------- processes


def _pidfile(node: nodes.Node, name: str) -> Path:
    return _dir(node) / f"{name}.pid"


def _in_node(node: nodes.Node, argv: Sequence[str]) -> list[str]:
    """Run in the node's mount namespace and its network namespace."""
    net = netns.netns_path(netns_name(node))
    return ["nsenter", "-t", str(_supervisor(node)), "-m", f"--net={net}", "--", *argv]


def _apiserver_url() -> str:
    """What the kubelets and the scheduler dial (inside a node: the forwarder's end)."""
    return f"https://127.0.0.1:{controlplane.Ports.from_env().apiserver}"


def _wait(
    what: str, ready: Callable[[], bool], log: Path, timeout: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise KubeletError(f"{what} not ready within {timeout:.0f}s; {log}:\n{_tail(log)}")
        time.sleep(0.2)


#: Paths a kubelet or containerd uses whatever their configuration says; each node gets
#: its own (bound over them in its mount namespace), or the kubelets would delete each
#: other's device-plugin socket and pod logs.
PRIVATE_DIRS = ("/var/lib/kubelet", "/var/lib/cni", "/var/log/pods", "/var/log/containers")


def _private(node: nodes.Node, path: str) -> Path:
    return _dir(node) / "private" / path.strip("/").replace("/", "-")


def _private_dirs(node: nodes.Node) -> None:
    script = "set -e\n"
    for path in PRIVATE_DIRS:
        mine = _private(node, path)
        mine.mkdir(parents=True, exist_ok=True)
        script += f"mkdir -p {path}\nmountpoint -q {path} || mount --bind {mine} {path}\n"
    subprocess.run(
        ["nsenter", "-t", str(_supervisor(node)), "-m", "--", "sh", "-c", script], check=True
    )


def _answers(node: nodes.Node) -> bool:
    """containerd serves its API (a socket file alone may be a crashed one's)."""
    socket_path = images.containerd_socket(node)
    if not socket_path.exists():
        return False
    result = subprocess.run(
        ["ctr", "--address", str(socket_path), "version"], capture_output=True, check=False
    )
    return result.returncode == 0


def _credentials(state_dir: Path, node: nodes.Node) -> Path:
    """The kubelet's kubeconfig: a client certificate for ``system:node:<name>``."""
    pki = state_dir / "controlplane" / "pki"
    name = f"node-{node.name}"
    controlplane.issue_client_cert(pki, name, f"/O=system:nodes/CN=system:node:{node.name}")
    server = _apiserver_url()
    return controlplane.cert_kubeconfig(_dir(node) / "kubeconfig", server, pki, name)


def _start_node(state_dir: Path, node: nodes.Node, index: int, every: Sequence[nodes.Node],
                binaries: Mapping[str, Path], archives: Iterable[Path]) -> None:  # fmt: skip
    base = _dir(node)
    base.mkdir(parents=True, exist_ok=True)
    containerd = _pidfile(node, "containerd")
    if pidfiles.running(containerd) is None:
        _private_dirs(node)
        config = _containerd_config(node)
        images.containerd_socket(node).unlink(missing_ok=True)  # a crashed one's
        pidfiles.spawn(
            containerd,
            base / "containerd.log",
            _in_node(node, ["containerd", "--config", str(config)]),
            marker=str(config),
        )
        _wait(f"{node.name}: containerd", partial(_answers, node), base / "containerd.log")
    for archive in archives:
        import_image(node, archive)
    kubelet = _pidfile(node, "kubelet")
    if pidfiles.running(kubelet) is None:
        _cgroups(node)
        pki = state_dir / "controlplane" / "pki"
        argv = [
            str(binaries["kubelet"]),
            f"--config={_kubelet_config(node, index, pki)}",
            f"--kubeconfig={_credentials(state_dir, node)}",
            f"--root-dir={base / 'kubelet'}",
            f"--hostname-override={node.name}",
            # Its underlay address: the Node's InternalIP, the hostIP of its pods (the
            # chart's agent takes it as its VXLAN endpoint).
            f"--node-ip={node.address}",
        ]
        pidfiles.spawn(kubelet, base / "kubelet.log", _in_node(node, argv), marker=argv[1])


def _start_scheduler(state_dir: Path, binary: Path) -> None:
    pki = state_dir / "controlplane" / "pki"
    base = state_dir / "controlplane"
    pidfile = base / "pids" / "kube-scheduler.pid"
    if pidfiles.running(pidfile) is not None:
        return
    controlplane.issue_client_cert(pki, "scheduler", "/CN=system:kube-scheduler")
    server = _apiserver_url()
    kubeconfig = controlplane.cert_kubeconfig(
        base / "kubeconfigs" / "scheduler.yaml", server, pki, "scheduler"
    )
    argv = [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        # Beside the controller manager's port (both overridable per system).
        f"--secure-port={controlplane.Ports.from_env().controller_manager + 2}",
        "--leader-elect=false",
    ]
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfiles.spawn(pidfile, base / "logs" / "kube-scheduler.log", argv, marker=argv[1])


def _node_ready(env: Mapping[str, str], name: str) -> bool:
    result = subprocess.run(
        ["kubectl", "get", "node", name, "-o",
         'jsonpath={.status.conditions[?(@.type=="Ready")].status}'],
        capture_output=True, text=True, env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        check=False,
    )  # fmt: skip
    return result.stdout.strip() == "True"


def up(state_dir: Path, env: Mapping[str, str], every: Sequence[nodes.Node]) -> None:
    """Make every node a kubelet node (idempotent); returns once all are Ready."""
    binaries = controlplane.ensure_binaries(controlplane.NODE_BINARIES)
    archives = [pause_archive(), virtfleet_archive()]
    subprocess.run(
        ["kubectl", "apply", "-f", "-"],
        input=json.dumps(_NODES_BINDING),
        text=True,
        check=True,
        capture_output=True,
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
    )
    _start_scheduler(state_dir, binaries["kube-scheduler"])
    for index, node in enumerate(every):
        _start_node(state_dir, node, index, every, binaries, archives)
    for node in every:
        _wait(f"{node.name}: Node Ready", partial(_node_ready, env, node.name),
              _dir(node) / "kubelet.log")  # fmt: skip


#: Kubelets authenticate as ``system:node:<name>`` in group ``system:nodes`` (RBAC only
#: here: no Node authorizer), bound to the bootstrap ``system:node`` role.
_NODES_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "virtfleet-e2e-nodes"},
    "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:node",
    },
    "subjects": [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}
    ],
}


def _pod_processes(node: nodes.Node) -> set[int]:
    """Every process in the node's pod cgroups, and its containerd shims."""
    pids: set[int] = set()
    tree = Path("/sys/fs/cgroup/pids") / cgroup_name(node)
    if tree.is_dir():
        for procs in tree.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):  # a pod's cgroup that went meanwhile
                pids |= {int(p) for p in procs.read_text().split()}
    ns_path = netns.netns_path(netns_name(node))
    if not ns_path.exists():
        return pids
    inode = ns_path.stat().st_ino
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0]
            if argv0.endswith(b"containerd-shim-runc-v2") and (
                (proc / "ns" / "net").stat().st_ino == inode
            ):
                pids.add(int(proc.name))
    return pids


def down(every: Iterable[nodes.Node]) -> None:
    """Stop the kubelets, their pods, containerd and the forwarders (before the nodes)."""
    for node in every:
        base = _dir(node)
        pidfiles.stop(_pidfile(node, "kubelet"))
        for pid in _pod_processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pidfiles.stop(_pidfile(node, "containerd"))
        _remove_cgroups(node)
        if base.exists():
            shutil.rmtree(base / "kubelet" / "pods", ignore_errors=True)


def _remove_cgroups(node: nodes.Node, timeout: float = 10.0) -> None:
    """The node's cgroup trees, deepest first, once the killed pods have left them."""
    pids = Path("/sys/fs/cgroup/pids") / cgroup_name(node)
    deadline = time.monotonic() + timeout
    while pids.is_dir() and time.monotonic() < deadline:
        if not any(p.read_text().strip() for p in pids.rglob("cgroup.procs")):
            break
        time.sleep(0.1)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        tree = hierarchy / cgroup_name(node)
        if not tree.is_dir():
            continue
        for directory in sorted(tree.rglob("*/"), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            tree.rmdir()


def stop_scheduler(state_dir: Path) -> None:
    pidfiles.stop(state_dir / "controlplane" / "pids" / "kube-scheduler.pid")


def pod_log(node: nodes.Node, namespace: str, pod: str, container: str) -> str:
    """A container's log as the node's kubelet wrote it (no ``kubectl logs``, see above)."""
    logs = _private(node, "/var/log/pods")
    found = sorted(logs.glob(f"{namespace}_{pod}_*/{container}/*.log"))
    return "".join(path.read_text(errors="replace") for path in found)
