"""Hostile values in every VM spec field, through the agent's decide/act path on a node.

tests/security/test_hostile_spec.py proves the *renderer* harmless. This module feeds the
same hostile values (one field at a time) to a real :class:`~virtfleet.agent.agent.Agent`
on libvirt's test driver with an in-memory API, and runs its reconcile — observe, decide,
act, write status — a few passes, then a snapshot of the VM, then the VM's deletion. No
exception may escape any of them: every pass ends with either a refusal the object shows
(``Ready=False`` with a reason that is not the catch-all ``InternalError``) or the
actions it decided. The catch-all in the work queue is a safety net, not a mapping.

No network: every address is on the agent's deny-list and host names are not resolved
(``AI_NUMERICHOST``), so an http disk is refused before any connection.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tests.agent.test_vmnetworks import PaperHost
from tests.security.test_hostile_spec import BASE, Path_, hostile_values, paths, replaced

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.locks import VmLocks
from virtfleet.agent.network import NetworkPolicy
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.snapshot.agent import SnapshotAgent
from virtfleet.hypervisor import Hypervisor, HypervisorSettings, storage
from virtfleet.identity import NODE_LABEL

NODE = "node-a"
UID = "0b9c1c4e-2f63-4d1a-9a55-7d0c3c1f2e10"
KEY = ("tenant-a", "web-1")
#: The renderer's spec, with an http disk on a (denied) loopback address.
AGENT_BASE: dict[str, Any] = replaced(
    BASE, ("disks", 4, "source", "http", "url"), "http://127.0.0.1:9/i.qcow2"
)
SECRET_SPEC: dict[str, Any] = replaced(
    AGENT_BASE, ("cloudInit",), {"userDataSecretRef": {"name": "seed", "key": "userdata"}}
)
AGENT_PATHS = paths(AGENT_BASE)
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def no_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only IP literals resolve: a hostile URL's host name never reaches a DNS server."""
    real = socket.getaddrinfo

    def numeric(host: Any, port: Any, family: int = 0, kind: int = 0, *rest: Any) -> Any:
        return real(host, port, family, kind, rest[0] if rest else 0, socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", numeric)


@pytest.fixture(autouse=True)
def seed_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test driver cannot upload: the seed (built from the hostile spec) becomes a
    blank volume of its size, so the VM goes on to be defined and started."""

    async def upload(
        hv: Hypervisor, pool: str, name: str, data: bytes, *, replace: bool = False
    ) -> storage.Volume:
        if replace and await storage.lookup_volume(hv, pool, name) is not None:
            await storage.delete_volume(hv, pool, name)
        return await storage.create_blank(hv, pool, name, max(len(data), 1), fmt="raw")

    monkeypatch.setattr(storage, "upload", upload)


async def node(directory: Path) -> Hypervisor:
    """A test-driver node with the pools and images the base spec names."""
    xml = directory / "node.xml"
    xml.write_text("<node/>")
    hv = Hypervisor(HypervisorSettings(uri=f"test://{xml}", executor_workers=2))
    await hv.open()
    for pool in ("virtfleet-images", "virtfleet-local", "fast"):
        await storage.ensure_pool(hv, pool, f"/{pool}")
    await storage.create_blank(hv, "virtfleet-images", "debian-12.qcow2", 2**20, fmt="qcow2")
    for image in ("vmlinuz", "initrd.img"):
        await storage.create_blank(hv, "virtfleet-images", image, 2**20, fmt="raw")
    return hv


def conditions(kube: FakeKube) -> dict[str, dict[str, Any]]:
    body = kube.objects.get(("VirtualMachine", *KEY))
    assert body is not None
    return {c["type"]: c for c in (body.get("status") or {}).get("conditions", [])}


async def scenario(
    spec: Any,
    where: Path_,
    seen: list[dict[str, Any]] | None = None,
    secret: bytes | None = None,
) -> None:
    """Reconcile the VM, snapshot it, delete it: nothing escapes, every pass is reported.

    ``seen`` collects the Ready condition after each pass.
    """
    with tempfile.TemporaryDirectory() as tmp:
        hv = await node(Path(tmp))
        try:
            await _scenario(hv, Path(tmp), spec, where, secret, [] if seen is None else seen)
        finally:
            await hv.close()


async def _scenario(
    hv: Hypervisor,
    tmp: Path,
    spec: Any,
    where: Path_,
    secret: bytes | None,
    seen: list[dict[str, Any]],
) -> None:
    kube = FakeKube()
    settings = AgentSettings(
        node_name=NODE,
        serial_log_dir="/serial",
        disk_pools=("virtfleet-local", "fast"),
        download_dir=str(tmp),
        http_deny_cidrs=("0.0.0.0/0", "::/0"),  # nothing is ever connected to
        # The base spec's bridge NIC is allowed (hostile names are not); no host firewall
        # on a test node (the user NIC's guard is tested where it lives).
        network=NetworkPolicy(allowed_bridges={KEY[0]: frozenset({"br0"})}, user_host_access=True),
        tunnel_address="192.0.2.10",
    )
    agent = Agent(settings, hv, kube)
    # Its network NIC's VMNetwork exists for every namespace (hostile names do not); the
    # node's plumbing is the host adapter's, tested where it lives (tests/hostnet).
    agent.networks.host = PaperHost()
    agent.networks.on_network_event(
        "ADDED",
        {"metadata": {"name": "default"}, "spec": {"namespaces": ["*"]}, "status": {"vni": 4096}},
    )
    if secret is not None:
        data = {"userdata": base64.b64encode(secret).decode()}
        kube.put("Secret", {"metadata": {"namespace": KEY[0], "name": "seed"}, "data": data})
    meta = {"namespace": KEY[0], "name": KEY[1], "uid": UID, "generation": 1}
    body = {
        "metadata": {**meta, "labels": {NODE_LABEL: NODE}},
        "spec": spec,
        "status": {"nodeName": NODE},  # placed by the controller (reconcile.claim)
    }
    agent.on_vm_event("ADDED", kube.put("VirtualMachine", body))
    for _ in range(3):
        await agent.reconcile(KEY)
        ready = conditions(kube).get("Ready")
        assert ready is not None, f"{where}: no Ready condition after a pass"
        assert ready["reason"] != "InternalError", f"{where}: {ready['message']}"
        seen.append(ready)

    snaps = SnapshotAgent(agent, VmLocks())
    snapshot = {"metadata": {**meta, "name": "s1", "uid": "s-1"}, "spec": {"vmName": KEY[1]}}
    snaps.on_snapshot_event("ADDED", kube.put("VMSnapshot", snapshot))
    await snaps.reconcile_snapshot((KEY[0], "s1"))
    stored = kube.objects[("VMSnapshot", KEY[0], "s1")].get("status") or {}
    assert stored.get("phase"), f"{where}: the snapshot says nothing"

    deleting = copy.deepcopy(kube.objects[("VirtualMachine", *KEY)])
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    agent.on_vm_event("MODIFIED", kube.put("VirtualMachine", deleting))
    for _ in range(4):
        if agent.finalized.get(KEY) is not None and agent.finalized[KEY].is_set():
            break
        await agent.reconcile(KEY)
    assert agent.finalized[KEY].is_set(), f"{where}: the VM's deletion did not finish"
    assert await hv.lookup(UID) is None


def test_the_base_spec_runs_on_the_node() -> None:
    """The starting point is not refused as a whole (else every example would be)."""
    ready: list[dict[str, Any]] = []
    asyncio.run(scenario(replaced(AGENT_BASE, ("disks",), AGENT_BASE["disks"][:4]), (), ready))
    assert ready[-1]["status"] == "True", ready[-1]


@SETTINGS
@given(path=st.sampled_from(AGENT_PATHS), value=hostile_values)
@example(path=("disks", 4, "source", "http", "url"), value="http://[::1/x")
@example(path=("disks", 4, "source", "http", "url"), value="http://h:abc/x")
@example(path=("disks", 4, "source", "http", "url"), value="http://h/a\x01b")
@example(path=("disks", 4, "source", "http", "url"), value="http://169.254.169.254/x")
@example(path=("memory", "size"), value="1e50")
def test_hostile_value_in_any_vm_field_through_the_agent(path: Path_, value: Any) -> None:
    asyncio.run(scenario(replaced(AGENT_BASE, path, value), path))


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=64) | st.sampled_from([b"\xff\xfe", b"#cloud-config\n\x80"]))
def test_any_secret_bytes_as_user_data(data: bytes) -> None:
    seen: list[dict[str, Any]] = []
    asyncio.run(scenario(copy.deepcopy(SECRET_SPEC), ("cloudInit",), seen, secret=data))
    try:
        data.decode()
    except UnicodeDecodeError:
        assert seen[-1]["reason"] == "SecretNotUTF8"
