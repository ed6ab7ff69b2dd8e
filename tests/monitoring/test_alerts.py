"""The alerts and the dashboard.

Alerts: valid rules; each fires on its synthetic series and not without (promtool, from
Debian's prometheus package); each has a runbook; each metric they read is one the agent
or the controller exports. The dashboard: valid JSON whose every query reads exported
metrics and defined variables.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, cast

import yaml

from testkit.kube import FakeKube
from virtfleet.agent.agent import Agent
from virtfleet.agent.metrics import AgentMetrics
from virtfleet.agent.settings import AgentSettings
from virtfleet.controller.controller import Controller
from virtfleet.controller.metrics import ControllerMetrics
from virtfleet.hypervisor import Hypervisor
from virtfleet.runtime.kubeapi import KubeApi
from virtfleet.runtime.metrics import reconcile_histogram

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "virtfleet" / "files" / "virtfleet-alerts.yaml"
TESTS = Path(__file__).parent / "virtfleet-alerts.test.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
DASHBOARD = REPO / "charts" / "virtfleet" / "files" / "virtfleet-dashboard.json"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, check=False, cwd=TESTS.parent
    )


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_its_series_and_not_without() -> None:
    result = promtool("test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load(TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", ())
    }
    assert {a["alert"] for a in alerts()} <= tested


def test_each_alert_has_its_runbook() -> None:
    text = RUNBOOKS.read_text()
    headings = {m.lower() for m in re.findall(r"^## (\w+)$", text, flags=re.M)}
    for alert in alerts():
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == alert["alert"].lower()
        assert anchor in headings, f"docs/runbooks.md has no section for {alert['alert']}"


def exported(exposition: bytes) -> set[str]:
    """Every series name a /metrics text can hold (counters' _total, histograms' parts)."""
    names: set[str] = set()
    for line in exposition.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names.add(name)
            if kind == "counter":
                names.add(f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}_{part}" for part in ("bucket", "count", "sum"))
    return names


async def all_exported(hv: Hypervisor) -> set[str]:
    agent = Agent(AgentSettings(node_name="node-a"), hv, cast(KubeApi, object()))
    agent_metrics = AgentMetrics(agent, 15.0)
    agent_metrics.collect_seconds = 0.01  # shown once a collection happened
    reconcile_histogram(agent_metrics.registry).labels("VirtualMachine").observe(0.1)
    controller_metrics = ControllerMetrics(Controller(FakeKube()))
    return exported(agent_metrics.exposition()) | exported(controller_metrics.exposition())


def names_in(expression: str) -> list[str]:
    return re.findall(r"\bvirtfleet_[a-z_]+\b", expression)


async def test_every_metric_the_alerts_read_is_exported(hv: Hypervisor) -> None:
    names = await all_exported(hv)
    for alert in alerts():
        for name in names_in(alert["expr"]):
            assert name in names, f"{alert['alert']} reads {name}, which nothing exports"


def dashboard_queries(node: Any) -> list[str]:
    """Every PromQL expression in the dashboard: panels' targets and variables' queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_queries(item)
    return found


async def test_the_dashboard_reads_only_exported_metrics(hv: Hypervisor) -> None:
    board = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(board)
    assert len(queries) > 15
    names = await all_exported(hv)
    for query in queries:
        assert names_in(query), f"a dashboard query reads no virtfleet metric: {query}"
        for name in names_in(query):
            assert name in names, f"the dashboard reads {name}, which nothing exports"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    variables = {v["name"] for v in board["templating"]["list"]}
    for query in queries:
        for used in re.findall(r"\$(\w+)", query):
            assert used in variables, f"{query} uses ${used}, which the dashboard lacks"
