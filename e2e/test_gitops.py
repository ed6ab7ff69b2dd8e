"""A real GitOps engine syncs VMs from Git: Flux v1.7.3's source- and kustomize-controller.

The repository is served on loopback by the harness (:mod:`harness.flux`) and holds
``examples/gitops/vms`` as the repo ships it; Flux is configured by
``examples/gitops/flux/{gitrepository,kustomization}.yaml`` as shipped, with only the URL
and the intervals changed. Each test builds on the previous one's commit (the module's
tests run in order, as a user's history would).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import flux, operators
from harness.gitserver import FLEET_PATH as VMS
from harness.gitserver import GitRepository, example_vm, fleet_repository, serve_git
from harness.testing import Cluster, condition, domain_name, domains, vm_gone, wait_for

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "gitops"
NAMESPACE = "apps"  # examples/gitops/vms/namespace.yaml
SYNC_TIMEOUT_S = 120.0


@dataclass
class Fleet:
    """The fleet repository, the GitRepository and Kustomization that sync it."""

    cluster: Cluster
    repo: GitRepository
    kustomization: str
    source: str

    def commit(self, message: str, files: dict[str, str | None]) -> str:
        """Commit and ask Flux to fetch now (what ``flux reconcile source git`` does)."""
        revision = self.repo.commit(message, files)
        self.request("gitrepository", self.source)
        return f"main@sha1:{revision}"

    def request(self, kind: str, name: str) -> str:
        token = str(time.time_ns())
        self.cluster.kubectl(
            "annotate", "--overwrite", "-n", flux.NAMESPACE, kind, name,
            f"reconcile.fluxcd.io/requestedAt={token}",
        )  # fmt: skip
        return token

    def kustomization_status(self) -> dict[str, Any]:
        obj = self.cluster.get("kustomization", self.kustomization, flux.NAMESPACE)
        return dict(obj.get("status") or {})

    def synced(self, revision: str) -> dict[str, Any] | None:
        """The Kustomization once it is Ready at ``revision``."""
        status = self.kustomization_status()
        ready = condition({"status": status}, "Ready")
        if status.get("lastAppliedRevision") == revision and ready and ready["status"] == "True":
            return status
        return None

    def failed(self, revision: str) -> dict[str, Any] | None:
        """The Kustomization's Ready condition once it is False for ``revision``."""
        status = self.kustomization_status()
        ready = condition({"status": status}, "Ready")
        attempted = status.get("lastAttemptedRevision") == revision
        return ready if attempted and ready and ready["status"] == "False" else None

    def vm(self, name: str) -> dict[str, Any]:
        return self.cluster.get("vm", name, NAMESPACE)


def _manifest(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((EXAMPLES / "flux" / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def fleet(system: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("git")
    server = serve_git(root)
    repo = fleet_repository(root / "fleet.git")
    source = _manifest("gitrepository.yaml")
    source["spec"].update(url=server.url("fleet.git"), interval="10s")
    kustomization = _manifest("kustomization.yaml")
    kustomization["spec"].update(interval="15s", retryInterval="5s", timeout="2m")
    try:
        flux.up(system.state_dir, system.env)
        system.apply(source)
        system.apply(kustomization)
        yield Fleet(system, repo, kustomization["metadata"]["name"], source["metadata"]["name"])
    finally:
        # Deleting a pruning Kustomization deletes what it applied (VMs and their domains).
        system.kubectl("delete", "-n", flux.NAMESPACE, "kustomization", "--all", "--wait=true",
                       "--timeout=120s", check=False)  # fmt: skip
        system.kubectl("delete", "-n", flux.NAMESPACE, "gitrepository", "--all", check=False)
        system.kubectl("delete", "namespace", NAMESPACE, "--timeout=120s", check=False)
        server.stop()
        flux.down(system.state_dir)


def _ready_since(obj: dict[str, Any]) -> datetime.datetime:
    ready = condition(obj, "Ready")
    assert ready is not None
    assert ready["status"] == "True", ready
    return datetime.datetime.fromisoformat(ready["lastTransitionTime"].replace("Z", "+00:00"))


def _where(fleet: Fleet, vm: str) -> str:
    """The state of ``vm``'s domain on the node its status names."""
    obj = fleet.vm(vm)
    node = fleet.cluster.node(obj["status"]["nodeName"])
    return domains(node).get(domain_name(NAMESPACE, vm), "absent")


def test_the_fleet_folder_syncs_and_halted_counts_as_healthy(fleet: Fleet) -> None:
    revision = f"main@sha1:{fleet.repo.head()}"
    status = wait_for(lambda: fleet.synced(revision), SYNC_TIMEOUT_S, 0.5, "the first sync")
    web, batch = fleet.vm("web"), fleet.vm("batch")
    assert web["status"]["printableStatus"] == "Running", web["status"]
    assert _where(fleet, "web") == "running"
    # Halted is a healthy end state: Ready=True, the domain defined and shut off.
    assert batch["status"]["printableStatus"] == "Stopped", batch["status"]
    assert condition(batch, "Ready")["status"] == "True"  # type: ignore[index]
    assert _where(fleet, "batch") == "shut off"
    # The Kustomization turned Ready no earlier than the VMs it waited for.
    kustomization_ready = _ready_since({"status": status})
    assert kustomization_ready >= _ready_since(web) - datetime.timedelta(seconds=1)
    inventory = {entry["id"] for entry in status["inventory"]["entries"]}
    assert "apps_web_virtfleet.io_VirtualMachine" in inventory, inventory


def test_a_vm_added_in_git_comes_up_and_the_kustomization_waits_for_it(
    fleet: Fleet, system: Cluster
) -> None:
    """The controller and node-b's agent are paused: ``api`` (pinned to node-b) has no
    status at all for a while, which kstatus alone calls Current; the example's health
    expressions make the Kustomization keep waiting until the VM is Ready."""
    paused = [operators.pid_of(system.state_dir, n) for n in ("controller", "agent-node-b")]
    for pid in paused:
        assert pid is not None
        os.killpg(pid, signal.SIGSTOP)
    try:
        revision = fleet.commit(
            "add api", {f"{VMS}/api.yaml": example_vm("api", nodeName="node-b")}
        )
        wait_for(lambda: fleet.cluster.kubectl("get", "vm", "api", "-n", NAMESPACE, check=False)
                 .returncode == 0, SYNC_TIMEOUT_S, 0.2, "Flux to create vm/api")  # fmt: skip
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            assert fleet.synced(revision) is None, "Ready while vm/api was never reconciled"
            time.sleep(0.5)
        status = fleet.kustomization_status()
        assert status.get("lastAttemptedRevision") == revision, status
        assert "status" not in fleet.vm("api")
    finally:
        for pid in paused:
            os.killpg(pid, signal.SIGCONT)  # type: ignore[arg-type]
    status = wait_for(lambda: fleet.synced(revision), SYNC_TIMEOUT_S, 0.2, "api to sync")
    api = fleet.vm("api")
    assert api["status"]["printableStatus"] == "Running", api["status"]
    assert _ready_since({"status": status}) >= _ready_since(api) - datetime.timedelta(seconds=1)
    assert _where(fleet, "api") == "running"


def test_a_commit_the_schema_refuses_fails_the_kustomization_with_the_message(
    fleet: Fleet,
) -> None:
    web = fleet.vm("web")
    good = fleet.repo.read(f"{VMS}/web.yaml")
    bad = good.replace("size: 128Mi", 'size: "1e30"')
    assert bad != good
    revision = fleet.commit("web: more memory than any node", {f"{VMS}/web.yaml": bad})
    ready = wait_for(lambda: fleet.failed(revision), SYNC_TIMEOUT_S, 0.5, "the failed apply")
    # The user reads the CRD's own message, naming the VM and the field.
    assert "VirtualMachine/apps/web" in ready["message"], ready
    assert "memory.size must be at least 16Mi and at most 16Ti" in ready["message"], ready
    # Nothing was applied: the running VM is untouched.
    after = fleet.vm("web")
    assert after["metadata"]["generation"] == web["metadata"]["generation"]
    assert _where(fleet, "web") == "running"
    revision = fleet.commit("web: revert", {f"{VMS}/web.yaml": good})
    wait_for(lambda: fleet.synced(revision), SYNC_TIMEOUT_S, 0.5, "the revert to sync")


def test_a_vm_that_stalls_fails_the_kustomization_and_says_why(fleet: Fleet) -> None:
    broken = example_vm("broken", kernel={"image": "missing-kernel"})
    revision = fleet.commit("add broken", {f"{VMS}/broken.yaml": broken})
    ready = wait_for(lambda: fleet.failed(revision), SYNC_TIMEOUT_S, 0.5, "the failed health check")
    assert ready["reason"] == "HealthCheckFailed", ready
    assert "VirtualMachine/apps/broken status: 'Failed'" in ready["message"], ready
    stalled = condition(fleet.vm("broken"), "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "ImageNotFound", stalled
    assert "missing-kernel" in stalled["message"], stalled
    events = fleet.cluster.kubectl(
        "get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=broken",
        "-o", "jsonpath={.items[*].reason}",
    ).stdout  # fmt: skip
    assert "ImageNotFound" in events, events
    revision = fleet.commit("remove broken", {f"{VMS}/broken.yaml": None})
    wait_for(lambda: fleet.synced(revision), SYNC_TIMEOUT_S, 0.5, "the removal to sync")


def test_removing_a_vm_from_git_prunes_it_and_its_domain(fleet: Fleet) -> None:
    node = fleet.cluster.node(fleet.vm("api")["status"]["nodeName"])
    revision = fleet.commit("remove api", {f"{VMS}/api.yaml": None})
    wait_for(lambda: fleet.synced(revision), SYNC_TIMEOUT_S, 0.5, "the prune")

    gone = partial(vm_gone, fleet.cluster, NAMESPACE, "api", node)
    wait_for(gone, 60, 0.5, "vm/api and its domain to be gone")
    assert _where(fleet, "web") == "running"


def _apply_results(log: Path, offset: int) -> list[dict[str, str]]:
    """What each ``server-side apply completed`` line after ``offset`` says per object."""
    results = []
    with log.open() as lines:
        lines.seek(offset)
        for line in lines:
            if "server-side apply completed" in line:
                results.append(json.loads(line)["output"])
    return results


def test_the_operator_never_causes_drift(fleet: Fleet, system: Cluster) -> None:
    before = fleet.kustomization_status()
    generations = {n: fleet.vm(n)["metadata"]["generation"] for n in ("web", "batch")}
    log = flux.log_path(system.state_dir, "kustomize-controller")
    offset = log.stat().st_size
    for _ in range(3):
        token = fleet.request("kustomization", fleet.kustomization)

        def handled(token: str = token) -> bool:
            return fleet.kustomization_status().get("lastHandledReconcileAt") == token

        wait_for(handled, SYNC_TIMEOUT_S, 0.5, "a requested reconcile")
    after = fleet.kustomization_status()
    assert after["lastAppliedRevision"] == before["lastAppliedRevision"]
    assert {n: fleet.vm(n)["metadata"]["generation"] for n in generations} == generations
    results = _apply_results(log, offset)
    assert len(results) >= 3, results
    for result in results:
        vms = {k: v for k, v in result.items() if k.startswith("VirtualMachine/")}
        assert vms, result
        assert set(vms.values()) == {"unchanged"}, result
