"""The nodes' network: each node in a network namespace of its own, joined by an underlay.

Why: on a real fleet every node has its own network stack — its own addresses, bridges,
VXLAN endpoints and firewall — and nodes reach each other over a network between them.
VMNetworks (bridge + VXLAN per node) and live migration over that network can only be
proven if the harness nodes are as separate. Per system (``tag``: a hash of its state
dir) and node ``i``:

- a bridge ``vfu<tag>`` on the machine (root namespace) holding ``<prefix>.1/24``: the
  machine's end of the underlay, where tests, ``virsh`` and benchmarks reach the nodes;
- the node's namespace ``vf<tag'>-<name>`` (:attr:`nodes.Node.netns`; kubelet nodes use
  the same), holding its libvirtd, virtlogd and QEMUs (and, in the harness, its agent,
  containerd and kubelet): a veth pair ``vfu<tag>n<i>`` (on the bridge) / ``ul0`` (in
  the node) with ``<prefix>.<11+i>/24`` (:attr:`nodes.Node.address`); libvirtd listens
  there, migrations and storage copies run over it;
- a forwarder per node (:mod:`harness.netns`) brings the apiserver (``127.0.0.1:<port>``
  and the ``kubernetes`` Service address) and the object store's S3 port into the node,
  as a node's route to its control plane would.

Nothing leaves the machine: no namespace has a default route, so a node reaches only
the underlay subnet, and the machine's own forwarding setting is left as it is (the
bridge is L2; a packet for another subnet has nowhere to go). ``<prefix>`` is
``10.231.<20..219>`` from the tag, or ``$VIRTFLEET_UNDERLAY_PREFIX`` (``10.231.7``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from harness import controlplane, netns, pidfiles

__all__ = [
    "NODE_DEVICE",
    "SERVICE_ADDRESS",
    "bridge_name",
    "ensure",
    "forward",
    "host_address",
    "prefix",
    "remove",
    "subnet",
]

#: The underlay device inside each node.
NODE_DEVICE = "ul0"
#: The ``kubernetes`` Service address pods dial (kubelet nodes; forwarded to the apiserver).
SERVICE_ADDRESS = "10.96.0.1"
_MTU = 1500
#: ``nodes.up`` starts the nodes in threads; the bridge is made once.
_LOCK = threading.Lock()


def _tag(state_dir: Path) -> str:
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:6]


def prefix(state_dir: Path) -> str:
    """The first three octets of the system's underlay subnet: chosen once (from the tag,
    skipping subnets the machine already routes, e.g. another system's) and kept in the
    state dir, so that ``down`` and later ``up`` find the same addresses."""
    chosen = os.environ.get("VIRTFLEET_UNDERLAY_PREFIX")
    if chosen:
        return chosen
    state_dir = Path(state_dir).resolve()
    kept = state_dir / "underlay-prefix"
    if kept.exists():
        return kept.read_text().strip()
    routes = _ip("-4", "route", "show").stdout
    start = int(_tag(state_dir), 16) % 200
    for step in range(200):
        candidate = f"10.231.{20 + (start + step) % 200}"
        if f"{candidate}.0/24" not in routes:
            state_dir.mkdir(parents=True, exist_ok=True)
            kept.write_text(candidate + "\n")
            return candidate
    raise RuntimeError("no free 10.231.x.0/24 subnet for the underlay")


def subnet(state_dir: Path) -> str:
    return f"{prefix(state_dir)}.0/24"


def host_address(state_dir: Path) -> str:
    """The machine's own address on the underlay (what nodes reach a test's server at)."""
    return f"{prefix(state_dir)}.1"


def node_address(state_dir: Path, index: int) -> str:
    return f"{prefix(state_dir)}.{11 + index}"


def bridge_name(state_dir: Path) -> str:
    return f"vfu{_tag(state_dir)}"


def _veth_name(state_dir: Path, index: int) -> str:
    return f"{bridge_name(state_dir)}n{index}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _exists(device: str, namespace: str | None = None) -> bool:
    where = ["-n", namespace] if namespace else []
    return _ip(*where, "link", "show", "dev", device, check=False).returncode == 0


def _ensure_bridge(state_dir: Path) -> None:
    bridge = bridge_name(state_dir)
    if not _exists(bridge):
        _ip("link", "add", bridge, "mtu", str(_MTU), "type", "bridge", "stp_state", "0")
        _ip("link", "set", bridge, "type", "bridge", "forward_delay", "0")
    shown = _ip("-o", "addr", "show", "dev", bridge).stdout
    if f" {host_address(state_dir)}/24 " not in shown:
        _ip("addr", "add", f"{host_address(state_dir)}/24", "dev", bridge)
    _ip("link", "set", bridge, "up")


def ensure(state_dir: Path, namespace: str, index: int) -> str:
    """The node's namespace, joined to the underlay (idempotent); returns its address."""
    with _LOCK:
        _ensure_bridge(state_dir)
    netns.create(namespace)
    address = node_address(state_dir, index)
    outside = _veth_name(state_dir, index)
    if not _exists(NODE_DEVICE, namespace):
        if _exists(outside):  # half-made by a crashed run: its peer went with the namespace
            _ip("link", "delete", outside)
        _ip("link", "add", outside, "mtu", str(_MTU), "type", "veth",
            "peer", "name", NODE_DEVICE, "netns", namespace)  # fmt: skip
    _ip("link", "set", outside, "master", bridge_name(state_dir), "up")
    shown = _ip("-n", namespace, "-o", "addr", "show", "dev", NODE_DEVICE).stdout
    if f" {address}/24 " not in shown:
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", NODE_DEVICE)
    _ip("-n", namespace, "link", "set", NODE_DEVICE, "up")
    return address


def _forwarder_pidfile(root: Path) -> Path:
    return root / "forwarder.pid"


def forward(root: Path, namespace: str, services: Mapping[str, int]) -> None:
    """Start the node's forwarder unless one runs: each ``127.0.0.1:<port>`` of
    ``services`` (name -> port on the machine's loopback) answers inside the node, and
    the apiserver also at the Service address."""
    netns.add_local_address(namespace, f"{SERVICE_ADDRESS}/32")
    pidfile = _forwarder_pidfile(root)
    if pidfiles.running(pidfile) is not None:
        return
    routes = [
        netns.Route(namespace, f"127.0.0.1:{port}", None, f"127.0.0.1:{port}")
        for port in services.values()
    ]
    api = controlplane.Ports.from_env().apiserver
    routes.append(netns.Route(namespace, f"{SERVICE_ADDRESS}:443", None, f"127.0.0.1:{api}"))
    argv = [sys.executable, "-m", "harness.netns", netns.spec_json(routes)]
    pidfiles.spawn(pidfile, root / "forwarder.log", argv, marker=json.dumps(namespace))


#: Further ports of the machine's loopback the nodes dial (comma-separated), e.g. another
#: system's object store that a disaster-recovery site restores from.
EXTRA_PORTS_VAR = "VIRTFLEET_NODE_EXTRA_PORTS"


def services(env: Mapping[str, str]) -> dict[str, int]:
    """What a node dials on its loopback: the apiserver, the S3 gateway, and the ports of
    ``$VIRTFLEET_NODE_EXTRA_PORTS``."""
    from harness import objectstore

    out = {"apiserver": controlplane.Ports.from_env().apiserver}
    if "VIRTFLEET_S3_ENDPOINT" in env:
        out["s3"] = int(env["VIRTFLEET_S3_ENDPOINT"].rsplit(":", 1)[1])
    else:
        out["s3"] = objectstore.base_port() + 6
    for port in filter(None, os.environ.get(EXTRA_PORTS_VAR, "").split(",")):
        out[f"extra-{port}"] = int(port)
    return out


def network_state_dir(namespace: str) -> Path:
    """Where the node's agent keeps its VMNetworks' DHCP servers' files: under /run (as
    on a node; every directory on the way must be searchable by dnsmasq's user)."""
    return Path("/run/virtfleet-e2e") / namespace / "networks"


def _stop_dhcp_servers(namespace: str) -> None:
    """The node agent's dnsmasqs (sessions of their own: they outlive the agent, as
    they must across its restarts; the node's end takes them)."""
    marker = str(network_state_dir(namespace)).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
    shutil.rmtree(network_state_dir(namespace).parent, ignore_errors=True)


def remove(state_dir: Path, root: Path, namespace: str, index: int) -> None:
    """The node's forwarder, DHCP servers, namespace and veth; the bridge too once it
    has no port."""
    pidfiles.stop(_forwarder_pidfile(root))
    _stop_dhcp_servers(namespace)
    netns.delete(namespace)
    outside = _veth_name(state_dir, index)
    if _exists(outside):
        _ip("link", "delete", outside, check=False)
    bridge = bridge_name(state_dir)
    if _exists(bridge) and not _ip("-o", "link", "show", "master", bridge).stdout.strip():
        _ip("link", "delete", bridge, check=False)
