"""Smoke run of the control-plane benchmarks (small N), so the suite cannot rot.

The fleet smoke stands for the one-node ``scale_testdriver`` and ``resync_testdriver``
scenarios too (VMs Running and Ready, an agent restart touching no domain): the same
code paths on three nodes; ``make bench`` runs them, lint type-checks them.

Each scenario runs against the session's system on a test-driver node and must produce
a sane result: every VM reached Running, the counters counted something, a restart
touched no domain. No timing is asserted (the machine is shared; ``bench/run`` reports
the figures).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.result import BenchContext, ScenarioResult  # noqa: E402
from bench.scenarios import fleet as fleet_scenario  # noqa: E402
from bench.scenarios import (  # noqa: E402
    metrics_cost,
    start_latency_testdriver,
)

from harness.testing import Cluster  # noqa: E402


@pytest.fixture
def ctx(system: Cluster, tmp_path: Path) -> BenchContext:
    return BenchContext(state_dir=system.state_dir, env=system.env, out_dir=tmp_path, small=True)


def row(result: ScenarioResult, metric: str) -> float | None:
    return next(r.virtfleet for r in result.rows if r.metric == metric)


def test_start_latency_smoke(ctx: BenchContext) -> None:
    result = start_latency_testdriver.run(ctx)
    reached = row(result, "VMs that reached Running")
    assert reached == len(result.samples["raw libvirt"]) > 0
    assert len(result.samples["virtfleet"]) == reached
    assert all(latency > 0 for latency in result.samples["virtfleet"])
    assert result.to_json()["rows"]


def test_metrics_cost_smoke(ctx: BenchContext) -> None:
    result = metrics_cost.run(ctx)
    assert row(result, "VMs Running and Ready (with metrics)") == 50
    assert next(r.raw for r in result.rows if r.metric.startswith("VMs Running")) == 50
    assert len(result.samples["scrape (agent, test driver)"]) == metrics_cost.SCRAPES
    assert (row(result, "series per scrape") or 0) > 0
    # The node's own series are there (the test driver reports no usage counters).
    assert row(result, "bulk statistics collection (agent's own gauge)") is not None
    assert (row(result, "synthetic: series per scrape") or 0) >= 50 * 40


def test_fleet_smoke(ctx: BenchContext) -> None:
    result = fleet_scenario.run(ctx)
    for ramp in ("steady", "burst"):
        assert row(result, f"{ramp}: VMs Running and Ready") == 60
        assert row(result, f"{ramp}: all Ready (first POST → last Ready)") is not None
        # The apiserver filters each agent's VM watch by its node: an agent hears of its
        # own VMs, not of the fleet's (3 nodes: ~3 without the selector).
        ratio = row(result, f"{ramp}: agents' VM watch events ÷ their own VMs' events")
        assert ratio is not None
        assert ratio <= 1.5
    assert row(result, "agent restart: domains touched") == 0
    assert row(result, "agent restart: start → every status fresh") is not None
    assert row(result, "controller restart: start → a new VM placed") is not None
