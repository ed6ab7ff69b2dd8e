"""The whole local system in one place: control plane + libvirt nodes + CRDs (+ operators).

``e2e/up`` and ``e2e/down`` and the pytest fixtures all go through ``up``/``down`` here,
so a person playing with the demo and a test run see exactly the same system.

Manual use: ``e2e/up [--operators] [--demo]``, ``source e2e/.state/env``, ``e2e/down``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness import (
    argocd,
    controlplane,
    flux,
    kube,
    kubelets,
    nodes,
    objectstore,
    operators,
    prometheus,
    underlay,
)
from harness import helm as helm_chart
from harness.kube import kubectl as kubectl

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "crds"
DEMO_MANIFEST = REPO / "examples" / "vm-basic.yaml"

#: Annotation on each Node: where its libvirtd answers (what an agent connects to).
LIBVIRT_URI_ANNOTATION = "virtfleet.io/libvirt-uri"
#: Label marking Nodes that run a virtfleet agent (what a DaemonSet would select on).
HYPERVISOR_LABEL = "virtfleet.io/hypervisor"


def default_state_dir() -> Path:
    return Path(os.environ.get("VIRTFLEET_E2E_STATE") or REPO / "e2e" / ".state")


def env_file(state_dir: Path) -> Path:
    return state_dir / "env"


def install_crds(env: Mapping[str, str]) -> None:
    """Apply crds/ server-side and wait until every CRD is Established."""
    kube.install_crds(env, CRDS_DIR.glob("*.yaml"))


def register_nodes(env: Mapping[str, str], node_list: Sequence[nodes.Node]) -> None:
    """Node objects as a kubelet would register them, plus the libvirt URI annotation.

    There is no kubelet here: the objects exist so the controller can place by node labels
    and the agents can be told apart, exactly as on a real cluster.
    """
    for node in node_list:
        manifest = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    HYPERVISOR_LABEL: "true",
                },
                "annotations": {LIBVIRT_URI_ANNOTATION: node.uri},
            },
        }
        kubectl(env, "apply", "--server-side", "-f", "-", input=json.dumps(manifest))
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.address or "127.0.0.1"},
                    {"type": "Hostname", "address": node.name},
                ]
            }
        }
        kubectl(
            env,
            "patch",
            "node",
            node.name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(status),
        )


def write_env(state_dir: Path, env: Mapping[str, str]) -> Path:
    path = env_file(state_dir)
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))
    return path


def read_env(state_dir: Path) -> dict[str, str]:
    """The environment of a running system, as ``up`` wrote it."""
    env: dict[str, str] = {}
    for line in env_file(state_dir).read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


def is_up(state_dir: Path) -> bool:
    return env_file(state_dir).exists() and bool(controlplane.pids(state_dir))


def up(
    state_dir: Path,
    *,
    with_operators: bool = False,
    demo: bool = False,
    kubelet: bool = False,
    helm: bool = False,
) -> dict[str, str]:
    """Bring the system up (idempotent) and return its environment; with ``kubelet``
    every node is also a kubelet node (:mod:`harness.kubelets`), with ``helm`` (implies
    it) the chart is installed there instead of starting the operators as processes."""
    if helm and with_operators:
        raise RuntimeError("--helm runs the operators as the chart's pods: drop --operators")
    kubelet = kubelet or helm
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = controlplane.up(state_dir)
    env.update(nodes.up(state_dir))
    env.update(objectstore.up(state_dir))
    for node in nodes.nodes_from_env(env):
        if node.netns is not None:
            underlay.forward(node.root, node.netns, underlay.services(env))
    env.update(prometheus.up(state_dir, env))
    env["VIRTFLEET_E2E_STATE"] = str(state_dir)
    install_crds(env)
    register_nodes(env, nodes.nodes_from_env(env))
    if kubelet:
        kubelets.up(state_dir, env, nodes.nodes_from_env(env))
        env["VIRTFLEET_KUBELET_NODES"] = "1"
    write_env(state_dir, env)
    env["VIRTFLEET_UP_SECONDS"] = f"{time.monotonic() - started:.1f}"
    if with_operators:
        operators.start(state_dir, env)
    if helm:
        helm_chart.install_chart(env, nodes.nodes_from_env(env))
        env["VIRTFLEET_UP_SECONDS"] = f"{time.monotonic() - started:.1f}"
    if demo:
        kubectl(env, "apply", "-f", str(DEMO_MANIFEST))
    return env


def down(state_dir: Path, *, wipe: bool = False, wipe_bucket: bool = False) -> None:
    """Stop everything ``up`` started, by pid; idempotent. ``wipe`` deletes the cluster's
    and the nodes' state but keeps the object store's buckets (a new cluster restores
    from them); ``wipe_bucket`` deletes those too."""
    operators.stop(state_dir)
    flux.down(state_dir)  # GitOps engines a test started (and may have left behind)
    argocd.down(state_dir)
    objectstore.down(state_dir, wipe=wipe_bucket)
    prometheus.down(state_dir)
    nodes_dir = state_dir / "nodes"
    names = sorted(p.name for p in nodes_dir.iterdir()) if nodes_dir.is_dir() else []
    try:
        if names:
            kubelets.down(nodes.nodes_from_env(_node_env(state_dir, names)))
        kubelets.stop_scheduler(state_dir)
    finally:  # whatever failed above, the nodes and the control plane still stop
        try:
            nodes.down(state_dir, wipe=wipe)
            _remove_guest_firewalls(names)
        finally:
            controlplane.down(state_dir, wipe=wipe)
            env_file(state_dir).unlink(missing_ok=True)


def _node_env(state_dir: Path, names: Sequence[str]) -> dict[str, str]:
    return {"VIRTFLEET_NODES_STATE_DIR": str(state_dir), "VIRTFLEET_NODE_NAMES": ",".join(names)}


def _remove_guest_firewalls(names: Sequence[str]) -> None:
    """The agents leave their nftables tables behind on purpose (running guests stay
    fenced while an agent restarts); with the nodes gone, they go too."""
    from virtfleet.agent.guestfirewall import removal

    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        return
    for name in names:
        result = subprocess.run(
            [nft, "-f", "-"], input=removal(name), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            print(f"could not remove the guest firewall of {name}: {result.stderr.strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2e/up | e2e/down", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument("--operators", action="store_true", help="up: also start the operators")
    parser.add_argument("--demo", action="store_true", help="up: also apply examples/vm-basic.yaml")
    parser.add_argument(
        "--kubelet", action="store_true", help="up: make the nodes kubelet nodes (pods run)"
    )
    parser.add_argument(
        "--helm", action="store_true", help="up: --kubelet, then helm install the chart there"
    )
    parser.add_argument(
        "--wipe", action="store_true",
        help="down: also delete cluster and node state (the object store's buckets stay)",
    )  # fmt: skip
    parser.add_argument(
        "--wipe-bucket", action="store_true", help="down: also delete the object store's data"
    )
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    try:
        if args.command == "up":
            env = up(
                state_dir,
                with_operators=args.operators,
                demo=args.demo,
                kubelet=args.kubelet,
                helm=args.helm,
            )
            print(
                f"virtfleet: up in {env['VIRTFLEET_UP_SECONDS']} s. Use it with:", file=sys.stderr
            )
            print(f"  source {env_file(state_dir)}", file=sys.stderr)
            print("  kubectl get vm,vmhost -A", file=sys.stderr)
            sys.stdout.write(env_file(state_dir).read_text())
        else:
            down(state_dir, wipe=args.wipe, wipe_bucket=args.wipe_bucket)
    except (
        controlplane.ControlPlaneError,
        nodes.NodeError,
        kubelets.KubeletError,
        RuntimeError,
    ) as err:
        print(f"virtfleet: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
