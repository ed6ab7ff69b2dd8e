"""What metrics cost an agent: 1,000 VMs on a test-driver node, with and without /metrics.

The same fleet bench runs twice in a row, each on a fresh agent and namespace: first with
no metrics endpoint, then with ``--metrics-listen`` (loopback, a free port) and the usage
collected every ``INTERVAL_S``. Each run creates every VM, waits until all are Running and
Ready (a watch), lets the agent settle, then measures:

- the agent's RSS (``VmRSS``) after settling, and its peak (``VmHWM``);
- its CPU per second over ``IDLE_S`` of idleness (no scrapes; with metrics this includes
  the bulk-statistics loop);
- with metrics only: ``SCRAPES`` scrapes back to back, each timed by the client (wall
  time of the GET, body read), and the agent's CPU during them minus its idle rate, per
  scrape; the body's size and its number of series.

The "raw" column of a row is the same figure of the run without metrics.

libvirt's test driver reports only ``state.*`` in ``getAllDomainStats`` (no CPU, balloon,
block or net counters), so the agent's scrapes above carry no per-VM usage series. The
cost of those is measured in process, at full shape: ``count`` synthetic records with
what a real QEMU domain answers (CPU, balloon, 2 vCPUs, 2 disks, 2 NICs) go through the
agent's own code — :func:`usage_from_stats` (the collection's pure part) and
:meth:`AgentMetrics.exposition` (what the endpoint serves; the usage text is rendered
once per collection, which the first call here does, and later scrapes reuse it), and
``tracemalloc`` says what the snapshot of usage holds.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from bench.result import BenchContext, Row, ScenarioResult
from harness import fakefleet, fleet, testdriver
from virtfleet.agent.metrics import AgentMetrics, VmUsage
from virtfleet.domain.stats import DeviceNames, usage_from_stats
from virtfleet.runtime.queue import WorkQueue

INTERVAL_S = 5.0
IDLE_S = 20.0
SETTLE_S = 5.0
SCRAPES = 50
SYNTHETIC_SCRAPES = 10
TARGET_SCRAPE_MS = 250.0
TARGET_RSS_GROWTH_MIB = 10.0


@dataclass
class FleetRun:
    """One fleet bench's figures (``scrape_*`` empty without metrics)."""

    ready: int
    ready_s: float | None
    rss_mib: float
    peak_mib: float
    idle_cpu_per_s: float
    scrape_ms: list[float] = field(default_factory=list)
    cpu_ms_per_scrape: float | None = None
    body_bytes: int = 0
    series: int = 0
    collection_s: float | None = None


def run(ctx: BenchContext) -> ScenarioResult:
    count = 50 if ctx.small else 1000
    result = ScenarioResult(
        name="metrics_cost",
        title=f"Metrics cost: {count} VMs on one test-driver node, with and without /metrics",
        sample_unit="ms",
    )
    idle_s = 3.0 if ctx.small else IDLE_S
    plain = _fleet_run(ctx, count, idle_s, port=None)
    measured = _fleet_run(ctx, count, idle_s, port=fakefleet.free_port())
    synthetic = _synthetic(count)

    scrape_p50 = statistics.median(measured.scrape_ms) if measured.scrape_ms else None
    scrape_max = max(measured.scrape_ms, default=None)
    growth = measured.rss_mib - plain.rss_mib
    result.samples = {"scrape (agent, test driver)": measured.scrape_ms}
    result.rows += [
        Row("VMs Running and Ready (with metrics)", measured.ready, "count", raw=plain.ready),
        Row("all Ready (with metrics)", measured.ready_s, "s", raw=plain.ready_s),
        Row("agent RSS after settling", measured.rss_mib, "MiB", raw=plain.rss_mib),
        Row(
            "  RSS growth from metrics",
            growth,
            "MiB",
            target=f"≤ {TARGET_RSS_GROWTH_MIB:.0f} MiB",
            ok=growth <= TARGET_RSS_GROWTH_MIB,
        ),
        Row("agent peak RSS", measured.peak_mib, "MiB", raw=plain.peak_mib),
        Row(
            "agent CPU while idle",
            measured.idle_cpu_per_s * 1000,
            "ms/s",
            raw=plain.idle_cpu_per_s * 1000,
        ),
        Row(
            "scrape p50 (client wall time)",
            scrape_p50,
            "ms",
            target=f"≤ {TARGET_SCRAPE_MS:.0f} ms",
            ok=scrape_p50 is not None and scrape_p50 <= TARGET_SCRAPE_MS,
        ),
        Row("scrape max", scrape_max, "ms"),
        Row("agent CPU per scrape", measured.cpu_ms_per_scrape, "ms"),
        Row("scrape body", measured.body_bytes / 1024, "KiB"),
        Row("series per scrape", measured.series, "count"),
        Row(
            "bulk statistics collection (agent's own gauge)",
            None if measured.collection_s is None else measured.collection_s * 1000,
            "ms",
        ),
        Row(f"synthetic: usage_from_stats × {count}", synthetic["parse_ms"], "ms"),
        Row(
            "synthetic: usage text rendered (once per collection)",
            synthetic["first_scrape_ms"],
            "ms",
            target=f"≤ {TARGET_SCRAPE_MS:.0f} ms",
            ok=synthetic["first_scrape_ms"] <= TARGET_SCRAPE_MS,
        ),
        Row("synthetic: later scrapes of the same snapshot", synthetic["scrape_ms"], "ms"),
        Row("synthetic: scrape body", synthetic["body_kib"], "KiB"),
        Row("synthetic: series per scrape", synthetic["series"], "count"),
        Row("synthetic: usage snapshot held", synthetic["snapshot_mib"], "MiB"),
    ]
    result.notes += [
        "raw = the same fleet bench, same run, with no metrics endpoint (the agent's default).",
        f"The agent collected usage every {INTERVAL_S:g} s (production default 15 s); idle CPU "
        f"over {IDLE_S:g} s without scrapes; then {SCRAPES} scrapes back to back, agent CPU "
        "during them minus the idle rate, per scrape.",
        "libvirt's test driver has no usage counters, so the agent's scrapes here carry its "
        "per-node and per-operation series only; the synthetic rows run the agent's own "
        f"collector code over {count} records shaped like a real QEMU domain's (CPU, balloon, "
        "2 vCPUs, 2 disks, 2 NICs: 8 + 2 × 8 + 2 × 8 series per VM), in this process.",
        "One run on 2 cores (the header gives the load average at its start): figures are noisy.",
    ]
    return result


def _fleet_run(ctx: BenchContext, count: int, idle_s: float, port: int | None) -> FleetRun:
    agent_args: list[str] = []
    if port is not None:
        agent_args = [
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--metrics-interval-seconds",
            f"{INTERVAL_S:g}",
        ]
    names = [f"vm-{i:04d}" for i in range(count)]
    prefix = "bench-metrics" if port is not None else "bench-nometrics"
    with testdriver.bench_fleet(
        ctx.state_dir, ctx.env, capacity_vms=count, prefix=prefix, agent_args=agent_args
    ) as bench:
        pid = bench.td.pid()
        assert pid is not None
        watch = fleet.VmWatch(
            bench.api,
            bench.namespace,
            predicate=lambda vm: fleet.is_running(vm) and fleet.is_ready(vm),
        ).start()
        try:
            began = time.monotonic()
            fleet.create_many(bench.api, bench.namespace, bench.manifests(names))
            all_ready = watch.wait_all(names, timeout=max(120.0, count * 0.5))
            ready_s = max(watch.seen_at.values(), default=began) - began
            reached = watch.count_seen(names)
        finally:
            watch.stop()
        time.sleep(max(SETTLE_S, INTERVAL_S))
        idle_before = testdriver.cpu_seconds(pid)
        time.sleep(idle_s)
        idle_rate = (testdriver.cpu_seconds(pid) - idle_before) / idle_s
        figures = FleetRun(
            ready=reached,
            ready_s=ready_s if all_ready else None,
            rss_mib=testdriver.rss_mib(pid),
            peak_mib=testdriver.peak_rss_mib(pid),
            idle_cpu_per_s=idle_rate,
        )
        if port is not None:
            _scrape(figures, pid, port, idle_rate)
    return figures


def _scrape(figures: FleetRun, pid: int, port: int, idle_rate: float) -> None:
    url = f"http://127.0.0.1:{port}/metrics"
    body = b""
    cpu_before, began = testdriver.cpu_seconds(pid), time.monotonic()
    for _ in range(SCRAPES):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as answer:
            body = answer.read()
        figures.scrape_ms.append((time.perf_counter() - started) * 1000)
    cpu = testdriver.cpu_seconds(pid) - cpu_before - idle_rate * (time.monotonic() - began)
    figures.cpu_ms_per_scrape = max(cpu, 0.0) / SCRAPES * 1000
    figures.body_bytes = len(body)
    lines = body.decode().splitlines()
    figures.series = sum(1 for line in lines if line and not line.startswith("#"))
    for line in lines:
        if line.startswith("virtfleet_usage_collection_seconds{"):
            figures.collection_s = float(line.rsplit(" ", 1)[1])


def _qemu_like_stats(i: int) -> dict[str, Any]:
    """What ``getAllDomainStats`` answers for a running QEMU domain (its groups' keys)."""
    stats: dict[str, Any] = {
        "cpu.time": 10_000_000_000 + i,
        "cpu.user": 6_000_000_000 + i,
        "cpu.system": 3_000_000_000 + i,
        "balloon.current": 1_048_576,
        "balloon.maximum": 1_048_576,
        "balloon.available": 1_000_000,
        "balloon.unused": 500_000,
        "balloon.rss": 300_000 + i,
        "vcpu.current": 2,
        "vcpu.maximum": 2,
        "block.count": 2,
        "net.count": 2,
    }
    for slot, target in enumerate(("vda", "vdb")):
        stats |= {
            f"block.{slot}.name": target,
            f"block.{slot}.rd.reqs": 1000 + i,
            f"block.{slot}.rd.bytes": 4_096_000 + i,
            f"block.{slot}.rd.times": 50_000_000,
            f"block.{slot}.wr.reqs": 500 + i,
            f"block.{slot}.wr.bytes": 2_048_000 + i,
            f"block.{slot}.wr.times": 40_000_000,
            f"block.{slot}.fl.reqs": 10,
            f"block.{slot}.fl.times": 1_000_000,
        }
    for slot in range(2):
        stats |= {
            f"net.{slot}.name": f"vnet{2 * i + slot}",
            f"net.{slot}.rx.bytes": 1_000_000 + i,
            f"net.{slot}.rx.pkts": 1000,
            f"net.{slot}.rx.errs": 0,
            f"net.{slot}.rx.drop": 0,
            f"net.{slot}.tx.bytes": 500_000 + i,
            f"net.{slot}.tx.pkts": 600,
            f"net.{slot}.tx.errs": 0,
            f"net.{slot}.tx.drop": 0,
        }
    return stats


def _synthetic(count: int) -> dict[str, float]:
    records = [_qemu_like_stats(i) for i in range(count)]
    names = [
        DeviceNames(
            disks={"vda": "root", "vdb": "data"},
            nics={f"vnet{2 * i}": "default", f"vnet{2 * i + 1}": "lan"},
        )
        for i in range(count)
    ]
    started = time.perf_counter()
    for stats, device_names in zip(records, names, strict=True):
        usage_from_stats(stats, device_names)
    parse_ms = (time.perf_counter() - started) * 1000

    agent = SimpleNamespace(
        settings=SimpleNamespace(node_name="bench-node"),
        queue=WorkQueue[str](name="vms"),
        cache={},
        hv=SimpleNamespace(connected=True, connection_generation=1),
        migration_samples={},
    )
    metrics = AgentMetrics(cast(Any, agent), INTERVAL_S)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    metrics.snapshot = [
        VmUsage("bench", f"vm-{i:04d}", usage_from_stats(stats, device_names))
        for i, (stats, device_names) in enumerate(zip(records, names, strict=True))
    ]
    held = tracemalloc.take_snapshot().compare_to(before, "filename")
    tracemalloc.stop()
    started = time.perf_counter()
    body = metrics.exposition()  # renders the usage text, as each collection does
    first_ms = (time.perf_counter() - started) * 1000
    timings = []
    for _ in range(SYNTHETIC_SCRAPES):
        started = time.perf_counter()
        body = metrics.exposition()
        timings.append((time.perf_counter() - started) * 1000)
    lines = body.decode().splitlines()
    return {
        "parse_ms": parse_ms,
        "first_scrape_ms": first_ms,
        "scrape_ms": statistics.median(timings),
        "body_kib": len(body) / 1024,
        "series": float(sum(1 for line in lines if line and not line.startswith("#"))),
        "snapshot_mib": sum(stat.size_diff for stat in held) / 2**20,
    }
