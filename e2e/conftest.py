"""Fixtures of the end-to-end suite: one real system per session, a namespace per test.

The session's system is the same one ``e2e/up`` starts (same state dir), so a running
``make demo`` is reused rather than clobbered; a system the session started itself is
stopped at the end (set VIRTFLEET_E2E_KEEP=1 to keep it for debugging).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cluster as local_system
from harness import nodes, operators, rbac
from harness.testing import Cluster, poll, wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    state_dir = local_system.default_state_dir().resolve()
    was_up = local_system.is_up(state_dir)
    env = local_system.up(state_dir)
    yield Cluster(state_dir=state_dir, env=env, nodes=nodes.nodes_from_env(env))
    if not was_up and not os.environ.get("VIRTFLEET_E2E_KEEP"):
        local_system.down(state_dir)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def bucket(system: Cluster) -> Iterator[str]:
    """A bucket of its own per test (deleted with what is left in it)."""
    from botocore.exceptions import ClientError

    from harness.backups import empty_bucket, s3

    name = f"bk-{uuid.uuid4().hex[:10]}"
    client = s3(system)
    client.create_bucket(Bucket=name)
    yield name

    # Emptied until it can be deleted: an upload that was under way may still land.
    def deleted() -> bool:
        empty_bucket(system, name)
        try:
            client.delete_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketNotEmpty":
                raise
            return False
        return True

    poll(deleted, 60, 1.0)


@pytest.fixture(scope="session")
def system(cluster: Cluster) -> Cluster:
    """The cluster with virtfleet running: an agent per node and the controller, each with
    the Helm chart's ServiceAccount and RBAC (not admin), so every test proves the RBAC."""
    cluster.env.update(rbac.chart_identities(cluster.state_dir, cluster.env))
    operators.start(cluster.state_dir, cluster.env)

    def hosts_ready() -> bool:
        out = cluster.kubectl("get", "vmhost", "-o", "name", check=False).stdout.split()
        return len(out) == len(cluster.nodes)

    wait_for(hosts_ready, 60, 0.5, "a VMHost from every agent")
    return cluster
