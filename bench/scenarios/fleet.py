"""Fleet scale: 10,000 VMs on 20 fake nodes, placed by the controller.

The fleet (``harness.fakefleet``): 20 agents, each on its own test-driver node, one
controller, the real apiserver and etcd. Its VMs select the fleet's nodes only; the
controller chooses among them. Two ramps, each in a namespace of its own:

- (a) steady: VMs created at ``RATE`` per second (a pacing thread, 4 POSTers);
- (b) burst: as fast as the apiserver takes them (16 POSTers).

Per VM (``fleet.VmWatch``, one watch on the namespace; client clock right before its
POST): creation → placed (``status.nodeName`` first seen), creation → ``Running``,
creation → Running and Ready. Per process (``/proc``): controller and agents' CPU
seconds during the ramp and RSS after it (``VmRSS``, peak ``VmHWM``). Requests: every
process's own count by client (virtfleet's client, kopf's), verb and resource from its
``/metrics`` (``virtfleet_apiserver_requests_total``), next to the apiserver's own
``apiserver_request_total`` writes. Watch events: what each agent's kopf streams received
for ``virtualmachines`` (``virtfleet_watch_events_received_total``, counted on the
socket, before any client-side filter) against the events of that agent's own VMs (the
benchmark's watch, per VM, summed by node): 1.0 means an agent receives only its own.

After the steady ramp, at full size:

- agent restart: one agent SIGKILLed; while it is down its node file is rewritten with
  its domains (what a real libvirtd keeps) and its VMs are marked Unknown; then the time
  from its start until each of them is Running and Ready again, and the actions it took;
- controller restart: SIGKILL, start, and at once a probe VM: the time from the start to
  the probe placed, and the writes to the fleet's VMs meanwhile (must be none).
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.result import BenchContext, Row, ScenarioResult
from bench.scenarios.resync_testdriver import acted, mark_unknown
from harness import fakefleet, fleet, operators, testdriver, testing

RATE = 20.0
STEADY_POSTERS = 4
BURST_POSTERS = 16
TARGET_BURST_S = 300.0
TARGET_P50_S = 1.0
TARGET_P95_S = 5.0
TARGET_AGENT_RSS_MIB = 80.0
TARGET_CONTROLLER_RSS_MIB = 400.0
TARGET_WRITES_PER_VM = 3.0
TARGET_CONTROLLER_RESTART_S = 10.0


def _placed(vm: Mapping[str, Any]) -> bool:
    return bool((vm.get("status") or {}).get("nodeName"))


def _ready(vm: Mapping[str, Any]) -> bool:
    return fleet.is_running(vm) and fleet.is_ready(vm)


@dataclass
class Ramp:
    """One ramp's figures."""

    label: str
    count: int
    posted: dict[str, float]
    watch: fleet.VmWatch
    began: float
    ready_s: float | None = None
    #: name → when first seen Running and Ready, taken when the ramp ends (the agent
    #: restart resets the watch's own record afterwards).
    ready_at: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    requests: dict[tuple[str, str, str, str], float] = field(default_factory=dict)
    writes: dict[tuple[str, str, str], float] = field(default_factory=dict)
    watch_events: dict[str, float] = field(default_factory=dict)
    #: node → events of its VMs during the ramp (taken before they are deleted).
    own_events: dict[str, int] = field(default_factory=dict)

    def latencies(self, milestone: str | None = None) -> list[float]:
        times = self.ready_at if milestone is None else self.watch.milestone_at[milestone]
        return sorted(times[n] - self.posted[n] for n in self.posted if n in times)


def sizes(ctx: BenchContext) -> tuple[int, int]:
    if ctx.small:
        return 3, 60
    nodes = int(os.environ.get("VIRTFLEET_FLEET_NODES", "20"))
    return nodes, int(os.environ.get("VIRTFLEET_FLEET_VMS", "10000"))


def run(ctx: BenchContext) -> ScenarioResult:
    node_count, count = sizes(ctx)
    result = ScenarioResult(
        name="fleet",
        title=f"Fleet scale: {count} VMs on {node_count} test-driver nodes",
        timeline_axes=("seconds since the first create", "VMs Running and Ready"),
    )
    capacity = math.ceil(count / node_count * 1.5) + 10
    # At 20 nodes the periodic work is the agents' main load: production rates there; the
    # smoke's three agents run at the harness's, as the rest of CI.
    the_fleet = fakefleet.start(
        ctx.state_dir,
        ctx.env,
        count=node_count,
        capacity_vms=capacity,
        production_rates=not ctx.small,
    )
    api = fleet.api_client(ctx.env)
    steady: Ramp | None = None
    burst: Ramp | None = None
    namespaces = {label: f"bench-fleet-{label}-{os.getpid()}" for label in ("steady", "burst")}
    try:
        steady = _ramp(ctx, the_fleet, api, "steady", namespaces["steady"], count, RATE)
        agent_restart = _agent_restart(ctx, the_fleet, api, steady)
        controller_restart = _controller_restart(ctx, api, steady)
        _delete(api, steady.count, namespaces["steady"])
        burst = _ramp(ctx, the_fleet, api, "burst", namespaces["burst"], count, None)
        _delete(api, burst.count, namespaces["burst"])
    finally:
        for ramp in (steady, burst):
            if ramp is not None:
                ramp.watch.stop()
        # An interrupted run's VMs go while the agents still run (their finalizers are
        # the agents'), or the next run would find thousands of VMs nobody can delete.
        for namespace in namespaces.values():
            _delete(api, count, namespace)
        fakefleet.stop(the_fleet, ctx.env)
        api.close()  # type: ignore[no-untyped-call]

    assert steady is not None
    assert burst is not None
    for ramp in (steady, burst):
        done = sorted(ramp.ready_at[n] - ramp.began for n in ramp.posted if n in ramp.ready_at)
        result.timelines[ramp.label] = [(t, i + 1) for i, t in enumerate(done)]
    result.samples = {
        "steady: creation → Running": steady.latencies("running"),
        "burst: creation → Running": burst.latencies("running"),
    }
    result.rows += _ramp_rows(steady, the_fleet, target_latency=True)
    result.rows += _ramp_rows(burst, the_fleet, target_latency=False)
    result.rows += agent_restart + controller_restart
    result.notes += [
        f"{node_count} agents (one process each, metrics on a loopback port) and one "
        "controller on 2 cores, beside the apiserver, etcd and this benchmark's own watch.",
        "Writes per VM: the apiserver's apiserver_request_total (POST/PUT/PATCH/DELETE on "
        "virtualmachines, main resource and /status) during the ramp, minus the benchmark's "
        "own POST; events are counted apart.",
        "Requests by client: each process's virtfleet_apiserver_requests_total (its own "
        "client and kopf's, counted in its aiohttp session), summed over the agents.",
        "Watch events ratio: events the agents' VM watches received (on the socket, before "
        "kopf's client-side filters) ÷ the events of their own VMs (seen by the benchmark's "
        "watch); 1.0 means every agent hears only of its own VMs.",
    ]
    return result


# --- a ramp ------------------------------------------------------------------------------


def _ramp(
    ctx: BenchContext,
    the_fleet: fakefleet.FakeFleet,
    api: Any,
    label: str,
    namespace: str,
    count: int,
    rate: float | None,
) -> Ramp:
    fleet.create_namespace(api, namespace)
    names = [f"vm-{i:05d}" for i in range(count)]
    watch = fleet.VmWatch(
        api,
        namespace,
        predicate=_ready,
        milestones={"placed": _placed, "running": fleet.is_running},
    ).start()
    pids = _pids(ctx, the_fleet)
    cpu_before = {name: testdriver.cpu_seconds(pid) for name, pid in pids.items()}
    requests_before = _requests(the_fleet)
    events_before = _watch_events(the_fleet)
    writes_before = fleet.write_counts(api)
    began = time.monotonic()
    posted = _create(api, namespace, names, rate)
    ramp = Ramp(label, count, posted, watch, began)
    all_ready = watch.wait_all(names, timeout=max(300.0, count * 0.2))
    ramp.ready_at = dict(watch.seen_at)
    if all_ready:
        ramp.ready_s = max(ramp.ready_at[n] for n in names) - began
    time.sleep(2.0)  # trailing status writes of the last VMs
    ramp.writes = fleet.count_delta(writes_before, fleet.write_counts(api))
    ramp.cpu = {name: testdriver.cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    ramp.rss = {name: testdriver.rss_mib(pid) for name, pid in pids.items()}
    ramp.peak = {name: testdriver.peak_rss_mib(pid) for name, pid in pids.items()}
    ramp.requests = _delta(requests_before, _requests(the_fleet))
    ramp.watch_events = _delta(events_before, _watch_events(the_fleet))
    ramp.own_events = _own_events(watch)
    return ramp


def _create(api: Any, namespace: str, names: list[str], rate: float | None) -> dict[str, float]:
    """POST every VM (paced at ``rate`` per second, or as fast as it goes); name → the
    client clock right before its POST."""
    posted: dict[str, float] = {}
    lock = threading.Lock()
    began = time.monotonic()

    def post(index_name: tuple[int, str]) -> None:
        index, name = index_name
        if rate is not None:
            delay = began + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        at = time.monotonic()
        fleet.create(api, namespace, fakefleet.vm_manifest(name, namespace))
        with lock:
            posted[name] = at

    workers = STEADY_POSTERS if rate is not None else BURST_POSTERS
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(post, enumerate(names)))
    return posted


def _delete(api: Any, count: int, namespace: str) -> None:
    """Every VM of ``namespace`` deleted (and waited for), then the namespace; a namespace
    already gone (or never made) is a no-op."""
    testdriver.delete_all(api, namespace, timeout=max(300.0, count * 0.1))
    fleet.delete_namespace(api, namespace)


def _pids(ctx: BenchContext, the_fleet: fakefleet.FakeFleet) -> dict[str, int]:
    pids = {td.name: td.pid() for td in the_fleet.nodes}
    pids["controller"] = operators.pid_of(ctx.state_dir, "controller")
    return {name: pid for name, pid in pids.items() if pid is not None}


def _samples(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    ]


def _requests(the_fleet: fakefleet.FakeFleet) -> dict[tuple[str, str, str, str], float]:
    """(process kind, client, verb, resource) → requests, summed over the agents."""
    counts: dict[tuple[str, str, str, str], float] = {}
    for td in the_fleet.nodes:
        for labels, value in _samples(
            the_fleet.scrape(td.name), "virtfleet_apiserver_requests_total"
        ):
            key = ("agent", labels["client"], labels["verb"], labels["resource"])
            counts[key] = counts.get(key, 0.0) + value
    return counts


def _watch_events(the_fleet: fakefleet.FakeFleet) -> dict[str, float]:
    """node → VM watch events its agent received."""
    events: dict[str, float] = {}
    for td in the_fleet.nodes:
        for labels, value in _samples(
            the_fleet.scrape(td.name), "virtfleet_watch_events_received_total"
        ):
            if labels["resource"] == "virtualmachines":
                events[td.name] = events.get(td.name, 0.0) + value
    return events


def _delta(before: Mapping[Any, float], after: Mapping[Any, float]) -> dict[Any, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _ramp_rows(ramp: Ramp, the_fleet: fakefleet.FakeFleet, *, target_latency: bool) -> list[Row]:
    label, count = ramp.label, ramp.count
    running = ramp.latencies("running")
    placed = ramp.latencies("placed")
    agents = [td.name for td in the_fleet.nodes]
    agent_rss = [ramp.rss[n] for n in agents if n in ramp.rss]
    agent_cpu = [ramp.cpu[n] for n in agents if n in ramp.cpu]
    vm_writes = {k: v for k, v in ramp.writes.items() if k[1] == "virtualmachines"}
    ours = (sum(vm_writes.values()) - vm_writes.get(("POST", "virtualmachines", ""), 0.0)) / count
    events_written = sum(v for k, v in ramp.writes.items() if k[1] == "events") / count
    own = ramp.own_events
    received = sum(ramp.watch_events.values())
    ratio = received / sum(own.values()) if sum(own.values()) else None
    p50 = statistics.median(running) if running else None
    p95 = fleet.percentile(running, 95) if running else None
    rows = [
        Row(f"{label}: VMs Running and Ready", ramp.watch.count_seen(ramp.posted), "count"),
        Row(
            f"{label}: all Ready (first POST → last Ready)",
            ramp.ready_s,
            "s",
            target="" if target_latency else f"≤ {TARGET_BURST_S:.0f} s",
            ok=None
            if target_latency
            else ramp.ready_s is not None and ramp.ready_s <= TARGET_BURST_S,
        ),
        Row(
            f"{label}: creation → Running p50",
            p50,
            "s",
            target=f"≤ {TARGET_P50_S:g} s" if target_latency else "",
            ok=(p50 is not None and p50 <= TARGET_P50_S) if target_latency else None,
        ),
        Row(
            f"{label}: creation → Running p95",
            p95,
            "s",
            target=f"≤ {TARGET_P95_S:g} s" if target_latency else "",
            ok=(p95 is not None and p95 <= TARGET_P95_S) if target_latency else None,
        ),
        Row(f"{label}: creation → placed p50", statistics.median(placed) if placed else None, "s"),
        Row(
            f"{label}: creation → placed p95", fleet.percentile(placed, 95) if placed else None, "s"
        ),
        Row(
            f"{label}: apiserver writes per VM (VM object, not the user's POST)",
            ours,
            "writes/VM",
            target=f"≤ {TARGET_WRITES_PER_VM:g}",
            ok=ours <= TARGET_WRITES_PER_VM,
        ),
        Row(f"{label}: Events written per VM", events_written, "writes/VM"),
        Row(
            f"{label}: agents' VM watch events ÷ their own VMs' events",
            ratio,
            "ratio",
            target="≈ 1",
            ok=ratio is not None and ratio <= 1.5,
        ),
        Row(
            f"{label}: controller RSS after the ramp",
            ramp.rss.get("controller"),
            "MiB",
            target=f"≤ {TARGET_CONTROLLER_RSS_MIB:g} MiB",
            ok=ramp.rss.get("controller", math.inf) <= TARGET_CONTROLLER_RSS_MIB,
        ),
        Row(f"{label}: controller peak RSS", ramp.peak.get("controller"), "MiB"),
        Row(f"{label}: controller CPU", ramp.cpu.get("controller"), "s"),
        Row(
            f"{label}: agent RSS after the ramp, max ({count // len(agents)} VMs each)",
            max(agent_rss, default=None),
            "MiB",
            target=f"≤ {TARGET_AGENT_RSS_MIB:g} MiB",
            ok=max(agent_rss, default=math.inf) <= TARGET_AGENT_RSS_MIB,
        ),
        Row(
            f"{label}: agent RSS, median",
            statistics.median(agent_rss) if agent_rss else None,
            "MiB",
        ),
        Row(f"{label}: agent CPU, sum of all agents", sum(agent_cpu), "s"),
    ]
    by_client: dict[tuple[str, str], float] = {}
    for (_, client, verb, _resource), value in ramp.requests.items():
        by_client[(client, verb)] = by_client.get((client, verb), 0.0) + value
    rows += [
        Row(f"{label}: agents' requests, {client} {verb}", value, "requests")
        for (client, verb), value in sorted(by_client.items())
        if value >= 1
    ]
    return rows


def _own_events(watch: fleet.VmWatch) -> dict[str, int]:
    """node → events of the VMs placed there (the benchmark's watch, per VM)."""
    own: dict[str, int] = {}
    for name, vm in list(watch.latest.items()):
        node = (vm.get("status") or {}).get("nodeName")
        if node:
            own[node] = own.get(node, 0) + watch.events.get(name, 0)
    return own


# --- restarts at full size -------------------------------------------------------------------


def _agent_restart(
    ctx: BenchContext, the_fleet: fakefleet.FakeFleet, api: Any, ramp: Ramp
) -> list[Row]:
    td = the_fleet.nodes[0]
    namespace = ramp.watch.namespace
    mine = [
        vm
        for vm in fleet.list_vms(api, namespace)
        if (vm.get("status") or {}).get("nodeName") == td.name
    ]
    names = [vm["metadata"]["name"] for vm in mine]
    testdriver.kill_agent(td, signal.SIGKILL)
    testdriver.write_node_file(td, [testdriver.domain_xml(vm) for vm in mine])
    fleet.run_parallel(lambda n: mark_unknown(api, namespace, n), names)
    unknown = testing.poll(
        lambda: all(
            (ramp.watch.latest.get(n, {}).get("status") or {}).get("printableStatus") == "Unknown"
            for n in names
        ),
        120,
        0.2,
    )
    if not unknown:
        raise RuntimeError("the restarted node's VMs were not all marked Unknown")
    ramp.watch.reset(predicate=_ready)
    log_offset = testdriver.log_size(td)
    began = time.monotonic()
    fakefleet.restart_agent(the_fleet, td, ctx.env)
    fresh = ramp.watch.wait_all(names, timeout=max(120.0, len(names) * 0.3))
    took = max(ramp.watch.seen_at[n] for n in names) - began if fresh and names else None
    touched = acted(testdriver.log_records(td, log_offset))
    return [
        Row(f"agent restart: its VMs ({td.name})", len(names), "count"),
        Row("agent restart: start → every status fresh", took, "s"),
        Row("agent restart: domains touched", len(touched), "count", target="0", ok=not touched),
    ]


def _controller_restart(ctx: BenchContext, api: Any, ramp: Ramp) -> list[Row]:
    namespace = ramp.watch.namespace
    operators.kill(ctx.state_dir, "controller", signal.SIGKILL)
    testing.poll(lambda: operators.pid_of(ctx.state_dir, "controller") is None, 30, 0.2)
    writes_before = fleet.write_counts(api)
    began = time.monotonic()
    operators.start_controller(ctx.state_dir, ctx.env)
    probe = "probe-after-controller-restart"
    fleet.create(api, namespace, fakefleet.vm_manifest(probe, namespace))
    placed = testing.poll(lambda: _placed(ramp.watch.latest.get(probe, {})), 120, 0.2)
    took = time.monotonic() - began if placed else None
    time.sleep(5.0)
    writes = fleet.count_delta(writes_before, fleet.write_counts(api))
    vm_writes = sum(v for k, v in writes.items() if k[1] == "virtualmachines")
    # The probe's own: its POST, the placement (label + finalizer, status), its agent's status.
    return [
        Row(
            "controller restart: start → a new VM placed",
            took,
            "s",
            target=f"≤ {TARGET_CONTROLLER_RESTART_S:g} s",
            ok=took is not None and took <= TARGET_CONTROLLER_RESTART_S,
        ),
        Row("controller restart: VM writes meanwhile (the probe's included)", vm_writes, "writes"),
    ]
