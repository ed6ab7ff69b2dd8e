"""The benchmark suite cannot rot: its smoke variant runs the real-guest scenarios against
the session's system and must produce a sane report (never judged on timings here: the
machine is shared and slow; ``make bench`` is where numbers are taken).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from harness.testing import Cluster

REPO = Path(__file__).resolve().parents[1]
#: The real-guest scenarios whose ground no e2e test covers. Failover, backup and
#: vmnetwork are left to `make bench` (lint type-checks them with the rest): their node
#: power-off, bucket round trips and two-node networks are the e2e tests' own
#: (test_failover.py, test_backups.py, test_vmnetworks.py), and CI's 45 minutes are tight.
SCENARIOS = (
    "start_latency_guests",
    "drift_healing",
    "migration_snapshot",
)


def virsh_domains(uri: str) -> list[str]:
    out = subprocess.run(
        ["virsh", "-q", "-c", uri, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [name for name in out.split() if name]


def test_small_benchmark_run_writes_a_sane_report(system: Cluster, tmp_path: Path) -> None:
    only = [arg for name in SCENARIOS for arg in ("--only", name)]
    run = subprocess.run(
        [str(REPO / "bench" / "run"), "--small", "--out", str(tmp_path), *only],
        capture_output=True,
        text=True,
        env={**os.environ, "VIRTFLEET_E2E_STATE": str(system.state_dir)},
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    [json_path] = tmp_path.glob("*-small.json")
    document = json.loads(json_path.read_text())
    assert document["small"] is True
    by_name = {s["name"]: s for s in document["scenarios"]}
    assert sorted(by_name) == sorted(SCENARIOS)
    for scenario in by_name.values():
        assert not scenario.get("error"), scenario
        assert scenario["rows"], scenario["name"]
        for row in scenario["rows"]:
            assert row["virtfleet"] is not None, row
            assert row["virtfleet"] > 0, row
            if row["raw"] is not None:
                assert row["ratio"] == row["virtfleet"] / row["raw"], row

    start = by_name["start_latency_guests"]
    assert len(start["samples"]["virtfleet"]) == 5, "every VM of the storm reached Running"
    assert len(start["samples"]["raw libvirt-python"]) == 5
    assert all(r["raw"] is not None for r in start["rows"]), "each row has its raw baseline"
    assert len(by_name["drift_healing"]["samples"]["virtfleet (healing)"]) == 3
    migration = {r["metric"].split(" (")[0]: r for r in by_name["migration_snapshot"]["rows"]}
    assert migration["live migration with storage copy: total"]["raw"] is not None

    markdown = json_path.with_suffix(".md").read_text()
    assert "| metric | virtfleet | raw libvirt | ratio | target | met |" in markdown
    for scenario in by_name.values():
        assert scenario["title"] in markdown
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert any("start-latency-guests-cdf" in p for p in pngs), pngs
    assert any("drift-healing-cdf" in p for p in pngs), pngs
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert png.name in markdown

    # Everything the scenarios made is gone again, virtfleet's VMs and the raw twins alike.
    for node in system.nodes:
        left = [d for d in virsh_domains(node.uri) if d.startswith("bench-")]
        assert not left, f"{node.name} still has {left}"
