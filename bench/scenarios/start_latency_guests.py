"""Start latency with real QEMU guests, next to raw libvirt doing the same work in the same run.

(b) KubeVirt's protocol: N VMs created 100 ms apart through virtfleet (pinned to node-a),
creation → ``Running`` per VM, then the same N domains defined and started with
libvirt-python with the same spacing on the same libvirtd. (c) One VM on an idle host,
apply → ``Running`` vs define+start, repeated, medians compared.

The guests are 64 MiB, without kernel or disk: QEMU starts and SeaBIOS finds nothing to
boot, which is all a start costs. The raw domains use virtfleet's own domain XML (renamed,
without uuid and ownership metadata), so both sides start exactly the same QEMU.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import libvirt

from bench import guests
from bench.result import BenchContext, Row, ScenarioResult

NODE = "node-a"
SPACING_S = 0.1
STORM_TIMEOUT_S = 300.0


def template_xml(ctx: BenchContext, namespace: str) -> str:
    """The domain XML virtfleet defines for a small VM (one warm-up VM, deleted again)."""
    api = guests.api_client(ctx.env)
    name = "warmup"
    with guests.RunningWatch(ctx.env, namespace) as watch:
        guests.create_vm(api, guests.small_vm(name, namespace, NODE))
        if not watch.wait_all([name], 120):
            raise guests.BenchError("the warm-up VM never reached Running")
    conn = libvirt.open(guests.node(ctx.env, NODE).uri)
    try:
        xml: str = conn.lookupByName(f"{namespace}_{name}").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    guests.delete_vms(ctx.env, namespace, [name], NODE)
    return xml


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def storm_virtfleet(ctx: BenchContext, namespace: str, count: int, tag: str) -> list[float]:
    """Create ``count`` VMs SPACING_S apart; creation → Running seconds of those that ran."""
    api = guests.api_client(ctx.env)
    names = [f"{tag}-{i:03d}" for i in range(count)]
    try:
        with (
            guests.RunningWatch(ctx.env, namespace) as watch,
            ThreadPoolExecutor(8, thread_name_prefix="create") as pool,
        ):
            start = time.monotonic() + 0.2
            futures = {}
            for i, name in enumerate(names):
                _sleep_until(start + i * SPACING_S)
                futures[name] = pool.submit(
                    guests.create_vm, api, guests.small_vm(name, namespace, NODE)
                )
            created = {name: f.result() for name, f in futures.items()}
            running = watch.wait_all(names, STORM_TIMEOUT_S)
        return [running[n] - created[n] for n in names if n in running]
    finally:
        guests.delete_vms(ctx.env, namespace, names, NODE)


def storm_raw(ctx: BenchContext, template: str, count: int, tag: str) -> list[float]:
    """Define+start ``count`` twins SPACING_S apart, each in its own thread; their seconds."""
    names = [f"{tag}-{i:03d}" for i in range(count)]
    conn = libvirt.open(guests.node(ctx.env, NODE).uri)
    try:
        with ThreadPoolExecutor(count, thread_name_prefix="raw") as pool:
            start = time.monotonic() + 0.2
            futures = []
            for i, name in enumerate(names):
                _sleep_until(start + i * SPACING_S)
                futures.append(
                    pool.submit(guests.raw_start, conn, guests.raw_twin_xml(template, name))
                )
            return [f.result() for f in futures]
    finally:
        guests.raw_remove(conn, names)
        conn.close()


def run(ctx: BenchContext) -> ScenarioResult:
    count = 5 if ctx.small else 100
    repeats = 1 if ctx.small else 5
    storms = 1 if ctx.small else 2
    namespace = guests.unique("bench-start")
    api = guests.api_client(ctx.env)
    guests.ensure_namespace(api, namespace)
    template = template_xml(ctx, namespace)

    vf_storm: list[float] = []
    raw_storm: list[float] = []
    # ABBA order over the rounds: the load of a shared machine drifts, both sides see it alike.
    for r in range(storms):
        sides = ("vf", "raw") if r % 2 == 0 else ("raw", "vf")
        for side in sides:
            if side == "vf":
                vf_storm += storm_virtfleet(ctx, namespace, count, f"storm{r}")
            else:
                raw_storm += storm_raw(ctx, template, count, f"{namespace}-raw{r}")

    vf_idle: list[float] = []
    raw_idle: list[float] = []
    for i in range(repeats):  # interleaved, so a noisy moment hits both sides alike
        vf_idle += storm_virtfleet(ctx, namespace, 1, f"idle{i}")
        raw_idle += storm_raw(ctx, template, 1, f"{namespace}-idle{i}")

    result = ScenarioResult(
        name="start_latency_guests",
        title=f"Start latency, real QEMU guests: {count} VMs {SPACING_S * 1000:.0f} ms apart "
        "and one VM on an idle host",
        rows=guests.latency_rows(f"{count} VMs: creation → Running", vf_storm, raw_storm, 1.15),
        samples={"virtfleet": vf_storm, "raw libvirt-python": raw_storm},
    )
    if vf_idle and raw_idle:
        vf_median, raw_median = statistics.median(vf_idle), statistics.median(raw_idle)
        result.rows.append(
            Row(
                metric=f"idle host: apply → Running (median of {repeats})",
                virtfleet=vf_median,
                raw=raw_median,
                unit="s",
                target="≤ raw + 0.2 s",
                ok=vf_median <= raw_median + 0.2,
            )
        )
    missing = count * storms - len(vf_storm)
    result.notes += [
        f"64 MiB guests without kernel or disk, pinned to {NODE}; raw = libvirt-python "
        "defineXML+create of the same domain XML on the same libvirtd, one thread per domain.",
        f"{storms} storm(s) per side in ABBA order, samples pooled.",
        "virtfleet = client-side create request → watch event with printableStatus Running.",
        f"idle host samples (s): virtfleet {[round(v, 3) for v in vf_idle]}, "
        f"raw {[round(v, 3) for v in raw_idle]}",
    ]
    if missing:
        result.notes.append(
            f"{missing} of {count * storms} VMs not Running within {STORM_TIMEOUT_S:.0f} s"
        )
    guests.delete_namespace(api, namespace)
    return result
