"""Fixtures of the end-to-end suite: one real system per session, a namespace per test.

The session's system is the same one ``e2e/up`` starts (same state dir), so a running
``make demo`` is reused rather than clobbered; a system the session started itself is
stopped at the end (set VIRTFLEET_E2E_KEEP=1 to keep it for debugging).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import cluster as system
from harness import nodes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Cluster:
    """Handles to the running system: kubectl, nodes and their serial logs."""

    state_dir: Path
    env: dict[str, str]
    nodes: list[nodes.Node] = field(default_factory=list)

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

    def node(self, name: str) -> nodes.Node:
        return next(n for n in self.nodes if n.name == name)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    state_dir = system.default_state_dir().resolve()
    was_up = system.is_up(state_dir)
    env = system.up(state_dir)
    yield Cluster(state_dir=state_dir, env=env, nodes=nodes.nodes_from_env(env))
    if not was_up and not os.environ.get("VIRTFLEET_E2E_KEEP"):
        system.down(state_dir)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    base = request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)
