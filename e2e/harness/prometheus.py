"""A real Prometheus (Debian's ``prometheus`` package) scraping the operators' /metrics.

Started with the rest of the harness (``cluster.up``) on 127.0.0.1; it scrapes every
node's agent on the node's underlay address (its network namespace, as a Prometheus in
a cluster reaches node ports) and the controller on loopback, every 2 s so tests see a
counter move within seconds. Tests ask it PromQL over its HTTP API (:func:`query`).
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from harness import nodes, pidfiles

#: Where the harness's agents serve /metrics, on their node's own address.
AGENT_METRICS_PORT = 18452
SCRAPE_SECONDS = 2


def port() -> int:
    return int(os.environ.get("VIRTFLEET_PROMETHEUS_PORT", "19090"))


def controller_metrics_port() -> int:
    """The controller's /metrics on loopback (a second harness sets its own)."""
    return int(os.environ.get("VIRTFLEET_CONTROLLER_METRICS_PORT", "18453"))


def url() -> str:
    return f"http://127.0.0.1:{port()}"


def _dir(state_dir: Path) -> Path:
    return state_dir / "prometheus"


def log_path(state_dir: Path) -> Path:
    return _dir(state_dir) / "prometheus.log"


def scrape_config(agent_addresses: list[str]) -> dict[str, Any]:
    every = f"{SCRAPE_SECONDS}s"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "scrape_configs": [
            {
                "job_name": "virtfleet-agent",
                "static_configs": [
                    {"targets": [f"{a}:{AGENT_METRICS_PORT}" for a in agent_addresses]}
                ],
            },
            {
                "job_name": "virtfleet-controller",
                "static_configs": [{"targets": [f"127.0.0.1:{controller_metrics_port()}"]}],
            },
        ],
    }


def up(state_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """Start (or find running) Prometheus for the nodes in ``env``."""
    base = _dir(state_dir)
    base.mkdir(parents=True, exist_ok=True)
    addresses = [n.address for n in nodes.nodes_from_env(env) if n.address and n.netns is not None]
    config = base / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(addresses)))
    data = base / "data"
    argv = [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port()}", "--storage.tsdb.retention.time=6h",
        "--web.enable-lifecycle", "--log.level=warn",
    ]  # fmt: skip
    pidfile = base / "prometheus.pid"
    if pidfiles.running(pidfile) is None:
        pidfiles.spawn(pidfile, log_path(state_dir), argv, marker=f"--storage.tsdb.path={data}")
    pidfiles.wait_answering(pidfile, f"{url()}/-/ready", log_path(state_dir), 60)
    return {"VIRTFLEET_PROMETHEUS_URL": url()}


def down(state_dir: Path) -> None:
    pidfiles.stop(_dir(state_dir) / "prometheus.pid")


def query(expression: str, base: str | None = None) -> list[dict[str, Any]]:
    """An instant PromQL query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
    address = f"{base or url()}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(address, timeout=10) as answer:
        body = json.loads(answer.read())
    if body.get("status") != "success":
        raise AssertionError(f"PromQL {expression!r}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def value(expression: str) -> float | None:
    """The single value of ``expression`` (None: no series)."""
    result = query(expression)
    if not result:
        return None
    if len(result) > 1:
        raise AssertionError(f"PromQL {expression!r}: {len(result)} series, want one")
    return float(result[0]["value"][1])
