"""``e2e/up`` and ``e2e/down``, the commands a person runs, on a system of their own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness import cluster as system

REPO = Path(__file__).resolve().parents[1]

#: Ports of its own, so this test can run beside the suite's shared system; below the
#: ephemeral range (32768-60999), where a client connection may hold any port.
OWN_PORTS = {
    "VIRTFLEET_ETCD_CLIENT_PORT": "25790",
    "VIRTFLEET_ETCD_PEER_PORT": "25800",
    "VIRTFLEET_APISERVER_PORT": "25443",
    "VIRTFLEET_CONTROLLER_MANAGER_PORT": "25257",
    "VIRTFLEET_NODE_PORT_BASE": "25610",
    "VIRTFLEET_OBJECTSTORE_PORT": "25300",
    "VIRTFLEET_PROMETHEUS_PORT": "25090",
    "VIRTFLEET_CONTROLLER_METRICS_PORT": "25453",
}


def run(script: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "e2e" / script), "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **OWN_PORTS},
        timeout=600,
        check=True,
    )


def processes_using(state_dir: Path) -> list[str]:
    """Command lines or mount tables of live processes that mention ``state_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            mounts = (proc / "mountinfo").read_text()
        except OSError:
            continue
        if str(state_dir) in cmdline or str(state_dir) in mounts:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_up_down_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "system"
    first = run("up", state_dir)
    env = system.read_env(state_dir)
    assert first.stdout == system.env_file(state_dir).read_text()
    keys = ("KUBECONFIG", "NODE_A_URI", "NODE_B_URI", "NODE_A_SERIAL_DIR", "NODE_B_SERIAL_DIR")
    for key in (*keys, "VIRTFLEET_S3_ENDPOINT", "VIRTFLEET_S3_SECRET_KEY"):
        assert env.get(key), f"{key} missing from {system.env_file(state_dir)}"
    print(f"\n[timing] {first.stderr.splitlines()[0]}")

    nodes = json.loads(system.kubectl(env, "get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert sorted(by_name) == ["node-a", "node-b"]
    uri = by_name["node-a"]["metadata"]["annotations"][system.LIBVIRT_URI_ANNOTATION]
    assert uri == env["NODE_A_URI"]
    assert by_name["node-b"]["metadata"]["labels"][system.HYPERVISOR_LABEL] == "true"
    system.kubectl(env, "get", "vm", "-A")  # the CRDs are installed

    assert run("up", state_dir).stdout == first.stdout  # idempotent

    run("down", state_dir)
    assert processes_using(state_dir) == []
    assert not system.env_file(state_dir).exists()
    run("down", state_dir)  # idempotent

    again = run("up", state_dir)
    print(f"[timing] warm {again.stderr.splitlines()[0]}")
    run("down", state_dir, "--wipe")
    assert processes_using(state_dir) == []


@pytest.mark.parametrize("flag", ["--operators", "--demo"])
def test_flags_are_accepted(flag: str) -> None:
    out = subprocess.run(
        [str(REPO / "e2e" / "up"), "--help"], capture_output=True, text=True, check=True
    )
    assert flag in out.stdout
