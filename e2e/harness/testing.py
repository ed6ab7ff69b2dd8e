"""What e2e tests hold on to: the running system and small polling helpers."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import cluster as system
from harness.nodes import Node


@dataclass
class Cluster:
    """Handles to the running system: kubectl, nodes and their serial logs."""

    state_dir: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return system.kubectl(self.env, *args, input=input, check=check)

    def apply(
        self, manifest: dict[str, Any] | str, *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.kubectl("apply", *extra, "-f", "-", input=text, check=check)

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        ns = ("-n", namespace) if namespace else ()
        out = self.kubectl("get", resource, name, *ns, "-o", "json").stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def poll(predicate: Callable[[], Any], timeout: float, interval: float) -> Any:
    """``predicate``'s first truthy value within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` otherwise."""
    value = poll(predicate, timeout, interval)
    if not value:
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
    return value


def vm_manifest(
    name: str, namespace: str, *, cmdline: str | None = None, **spec: Any
) -> dict[str, Any]:
    """A VirtualMachine that boots the harness guest (direct kernel boot, 128 MiB)."""
    from harness.guest import guest_cmdline
    from harness.nodes import INITRD_VOLUME, KERNEL_VOLUME

    body: dict[str, Any] = {
        "memory": {"size": "128Mi"},
        "kernel": {
            "image": KERNEL_VOLUME,
            "initrd": INITRD_VOLUME,
            "cmdline": cmdline or guest_cmdline(),
        },
        "terminationGracePeriodSeconds": 5,
        **spec,
    }
    return vm_object(name, namespace, body)


def vm_object(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A VirtualMachine object around ``spec``."""
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def snapshot_manifest(name: str, namespace: str, vm: str, **spec: Any) -> dict[str, Any]:
    """A VMSnapshot of ``vm`` (``quiesce=True``... go into its spec)."""
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMSnapshot",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"vmName": vm, **spec},
    }


def wait_phase(
    cluster: Cluster, kind: str, ns: str, name: str, phases: tuple[str, ...], timeout: float = 90
) -> dict[str, Any]:
    """The object once its ``status.phase`` is one of ``phases``."""

    def check() -> dict[str, Any] | None:
        obj = cluster.get(kind, name, ns)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    result: dict[str, Any] = wait_for(check, timeout, 0.1, f"{kind} {ns}/{name} in {phases}")
    return result


def migration_manifest(name: str, namespace: str, vm: str, **spec: Any) -> dict[str, Any]:
    """A VMMigration of ``vm`` (``targetNode=...``, ``policy=...`` go into its spec)."""
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMMigration",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"vmName": vm, **spec},
    }


def in_node(node: Node, *argv: str, check: bool = True) -> str:
    """``argv``'s output, run in the node's network namespace (``ip netns exec``)."""
    assert node.netns is not None, f"{node.name} has no network namespace"
    return subprocess.run(
        ["ip", "netns", "exec", node.netns, *argv],
        capture_output=True, text=True, timeout=60, check=check,
    ).stdout  # fmt: skip


def virsh(node: Node, *args: str, check: bool = True) -> str:
    """``virsh -c <node> args``' output (an AssertionError with its stderr on failure)."""
    result = subprocess.run(
        ["virsh", "-q", "-c", node.uri, *args], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {result.stderr}")
    return result.stdout


def guest_exec(node: Node, domain: str, script: str, timeout: float = 60) -> str:
    """Run ``sh -c script`` in the guest through its qemu-guest-agent (``guest-exec``),
    via ``virsh qemu-agent-command`` on the node: its standard output."""
    started = json.loads(
        virsh(
            node,
            "qemu-agent-command",
            domain,
            json.dumps(
                {
                    "execute": "guest-exec",
                    "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True},
                }
            ),
        )
    )
    pid = started["return"]["pid"]

    def finished() -> dict[str, Any] | None:
        answer = json.loads(
            virsh(node, "qemu-agent-command", domain,
                  json.dumps({"execute": "guest-exec-status", "arguments": {"pid": pid}}))
        )["return"]  # fmt: skip
        return answer if answer.get("exited") else None

    done = wait_for(finished, timeout, 0.5, f"guest-exec of {script!r}")
    out = base64.b64decode(done.get("out-data", "")).decode(errors="replace")
    if done.get("exitcode") != 0:
        err = base64.b64decode(done.get("err-data", "")).decode(errors="replace")
        raise AssertionError(f"guest-exec {script!r}: exit {done.get('exitcode')}: {err}")
    return out


def vm_ip(system: Cluster, namespace: str, name: str, timeout: float = 120) -> str:
    """The first address in the VM's ``status.interfaces`` (waits for one)."""

    def ip() -> str | None:
        nics = (system.get("vm", name, namespace).get("status") or {}).get("interfaces") or []
        return next((n.get("ip") for n in nics if n.get("ip")), None)

    return str(wait_for(ip, timeout, 0.5, f"{name}'s address in status.interfaces"))


def console(node: Node, namespace: str, name: str, pattern: str, timeout: float = 120) -> str:
    """The first match of ``pattern`` (a line, re.MULTILINE) on the VM's serial console."""
    from harness.nodes import wait_for_serial

    found = wait_for_serial(node, domain_name(namespace, name), pattern, timeout=timeout)
    return found.group(0).strip()


def dhcp_servers(node: Node) -> list[int]:
    """The pids of the node's VMNetwork dnsmasqs (each in a namespace of its own, on its
    network's segment: a place on the node to reach that node's VMs from)."""
    assert node.netns is not None
    out = subprocess.run(
        ["pgrep", "-f", f"dnsmasq.*{node.netns}"], capture_output=True, text=True, check=False
    ).stdout
    return [int(pid) for pid in out.split()]


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return None


def domain_name(namespace: str, name: str) -> str:
    return f"{namespace}_{name}"


def domains(node: Node) -> dict[str, str]:
    """name → state of every domain on the node, as ``virsh list --all`` shows them."""
    result = subprocess.run(
        ["virsh", "-q", "-c", node.uri, "list", "--all"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3:
            out[parts[1]] = parts[2].strip()
    return out


def vm_gone(cluster: Cluster, namespace: str, name: str, node: Node) -> bool:
    """True once the VM object is gone and its domain with it (e.g. pruned from Git)."""
    absent = cluster.kubectl("get", "vm", name, "-n", namespace, check=False).returncode != 0
    return absent and domain_name(namespace, name) not in domains(node)
