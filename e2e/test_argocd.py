"""Argo CD syncs VMs from Git and judges them with virtfleet's Lua health checks.

Argo CD v3.2.12's application controller and repo server (:mod:`harness.argocd`) sync
``examples/gitops/vms`` from a loopback git server, configured by
``examples/gitops/argocd/application.yaml`` as shipped (only the repository URL
changed) and the health checks of ``gitops/argocd/argocd-cm-patch.yaml``. The same
story as ``test_gitops.py`` (Flux); each test builds on the previous one's commit.
"""

from __future__ import annotations

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

from harness import argocd, operators
from harness.gitserver import FLEET_PATH as VMS
from harness.gitserver import GitRepository, example_vm, fleet_repository, serve_git
from harness.testing import Cluster, condition, domain_name, domains, vm_gone, wait_for

REPO = Path(__file__).resolve().parents[1]
APPLICATION = REPO / "examples" / "gitops" / "argocd" / "application.yaml"
NAMESPACE = "apps"
SYNC_TIMEOUT_S = 120.0


@dataclass
class App:
    cluster: Cluster
    repo: GitRepository
    name: str

    def status(self) -> dict[str, Any]:
        obj = self.cluster.get("application", self.name, argocd.NAMESPACE)
        return dict(obj.get("status") or {})

    def commit(self, message: str, files: dict[str, str | None]) -> str:
        """Commit and ask Argo CD to look at Git now (what ``argocd app get --refresh`` does)."""
        revision = self.repo.commit(message, files)
        self.cluster.kubectl(
            "annotate", "--overwrite", "-n", argocd.NAMESPACE, "application", self.name,
            "argocd.argoproj.io/refresh=normal",
        )  # fmt: skip
        return revision

    def settled(self, revision: str, health: str = "Healthy") -> dict[str, Any] | None:
        """The status once ``revision`` is synced and the app's health is ``health``."""
        status = self.status()
        sync = status.get("sync") or {}
        ok = sync.get("status") == "Synced" and sync.get("revision") == revision
        return status if ok and (status.get("health") or {}).get("status") == health else None

    def resource(self, status: dict[str, Any], name: str) -> dict[str, Any]:
        return next(r for r in status["resources"] if r["name"] == name)

    def vm(self, name: str) -> dict[str, Any]:
        return self.cluster.get("vm", name, NAMESPACE)


@pytest.fixture(scope="module")
def app(system: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    root = tmp_path_factory.mktemp("git")
    server = serve_git(root)
    repo = fleet_repository(root / "fleet.git")
    application = yaml.safe_load(APPLICATION.read_text())
    application["spec"]["source"]["repoURL"] = server.url("fleet.git")
    try:
        argocd.up(system.state_dir, system.env)
        system.apply(application)
        yield App(system, repo, application["metadata"]["name"])
    finally:
        system.kubectl("delete", "-n", argocd.NAMESPACE, "application", "--all", check=False)
        system.kubectl("delete", "namespace", NAMESPACE, "--timeout=120s", check=False)
        server.stop()
        argocd.down(system.state_dir)


def _state(app: App, vm: str) -> str:
    node = app.cluster.node(app.vm(vm)["status"]["nodeName"])
    return domains(node).get(domain_name(NAMESPACE, vm), "absent")


def test_the_fleet_syncs_healthy_and_halted_is_healthy(app: App) -> None:
    status = wait_for(
        lambda: app.settled(app.repo.head()), SYNC_TIMEOUT_S, 0.5, "the first sync, Healthy"
    )
    assert app.resource(status, "web")["health"]["status"] == "Healthy"
    assert _state(app, "web") == "running"
    batch = app.resource(status, "batch")["health"]
    assert batch["status"] == "Healthy", batch  # Halted on purpose
    assert _state(app, "batch") == "shut off"


def test_a_vm_added_in_git_is_progressing_until_it_runs(app: App, system: Cluster) -> None:
    paused = [operators.pid_of(system.state_dir, n) for n in ("controller", "agent-node-b")]
    for pid in paused:
        assert pid is not None
        os.killpg(pid, signal.SIGSTOP)
    try:
        revision = app.commit("add api", {f"{VMS}/api.yaml": example_vm("api", nodeName="node-b")})
        status = wait_for(
            lambda: app.settled(revision, "Progressing"), SYNC_TIMEOUT_S, 0.5, "api Progressing"
        )
        health = app.resource(status, "api")["health"]
        assert health["status"] == "Progressing", health
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            assert (app.status().get("health") or {}).get("status") != "Healthy"
            time.sleep(0.5)
    finally:
        for pid in paused:
            os.killpg(pid, signal.SIGCONT)  # type: ignore[arg-type]
    wait_for(lambda: app.settled(revision), SYNC_TIMEOUT_S, 0.5, "api Healthy")
    assert app.vm("api")["status"]["printableStatus"] == "Running"
    assert _state(app, "api") == "running"


def test_a_commit_the_schema_refuses_fails_the_sync_with_the_message(app: App) -> None:
    web = app.vm("web")
    good = app.repo.read(f"{VMS}/web.yaml")
    revision = app.commit("web: too much", {f"{VMS}/web.yaml": good.replace("128Mi", '"1e30"')})

    def failed() -> dict[str, Any] | None:
        """The sync of ``revision`` once web's apply failed (Argo CD retries it, with the
        message, until a newer commit is there: the example's ``retry.refresh``)."""
        operation = app.status().get("operationState") or {}
        result = operation.get("syncResult") or {}
        web = [r for r in result.get("resources") or [] if r["name"] == "web"]
        refused = web and web[0]["status"] == "SyncFailed"
        return operation if result.get("revision") == revision and refused else None

    operation = wait_for(failed, SYNC_TIMEOUT_S, 0.5, "the failed sync")
    assert "memory.size must be at least 16Mi and at most 16Ti" in operation["message"], operation
    assert app.status()["sync"]["status"] == "OutOfSync"
    assert app.vm("web")["metadata"]["generation"] == web["metadata"]["generation"]
    assert _state(app, "web") == "running"
    revision = app.commit("web: revert", {f"{VMS}/web.yaml": good})
    wait_for(lambda: app.settled(revision), SYNC_TIMEOUT_S, 0.5, "the revert, Healthy")


def test_a_vm_that_stalls_is_degraded_with_its_message(app: App) -> None:
    broken = example_vm("broken", kernel={"image": "missing-kernel"})
    revision = app.commit("add broken", {f"{VMS}/broken.yaml": broken})
    status = wait_for(lambda: app.settled(revision, "Degraded"), SYNC_TIMEOUT_S, 0.5, "Degraded")
    health = app.resource(status, "broken")["health"]
    assert health["status"] == "Degraded", health
    assert "ImageNotFound" in health["message"], health
    assert "missing-kernel" in health["message"], health
    stalled = condition(app.vm("broken"), "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "ImageNotFound"
    revision = app.commit("remove broken", {f"{VMS}/broken.yaml": None})
    wait_for(lambda: app.settled(revision), SYNC_TIMEOUT_S, 0.5, "Healthy again")


def test_removing_a_vm_from_git_prunes_it_and_its_domain(app: App) -> None:
    node = app.cluster.node(app.vm("api")["status"]["nodeName"])
    revision = app.commit("remove api", {f"{VMS}/api.yaml": None})
    wait_for(lambda: app.settled(revision), SYNC_TIMEOUT_S, 0.5, "the prune")

    gone = partial(vm_gone, app.cluster, NAMESPACE, "api", node)
    wait_for(gone, 60, 0.5, "vm/api and its domain to be gone")


def test_the_operator_never_causes_drift(app: App) -> None:
    """Over several of Argo CD's 10 s reconciliations: always Synced, no new sync (self-heal
    would sync any drift), every VM's generation unchanged."""
    before = app.status()
    generations = {n: app.vm(n)["metadata"]["generation"] for n in ("web", "batch")}
    deadline = time.monotonic() + 35
    while time.monotonic() < deadline:
        status = app.status()
        assert status["sync"]["status"] == "Synced", status["sync"]
        time.sleep(1)
    after = app.status()
    assert after["reconciledAt"] != before["reconciledAt"]  # it did look again
    assert len(after.get("history") or []) == len(before.get("history") or [])
    assert after["operationState"]["finishedAt"] == before["operationState"]["finishedAt"]
    assert {n: app.vm(n)["metadata"]["generation"] for n in generations} == generations
