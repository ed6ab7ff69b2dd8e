"""Drift healing: a running VM's domain is destroyed behind virtfleet's back; how long until
it runs again?

Each try destroys a different VM once (the run strategy rightly backs off when one VM is
killed again within a minute of its start, which would measure the back-off instead).
The clock runs from the destroy call to the moment libvirt reports the domain running
with a new QEMU (a new domain id), polled every 10 ms on a connection of our own.
Raw libvirt has no healing: its reference is a script's destroy + start of a twin domain.
"""

from __future__ import annotations

import time

import libvirt

from bench import guests, report
from bench.result import BenchContext, Row, ScenarioResult

NODE = "node-a"
POLL_S = 0.01
HEAL_TIMEOUT_S = 60.0


def heal_seconds(conn: libvirt.virConnect, domain: str) -> float:
    """Destroy ``domain`` and return the seconds until it is running again (new QEMU)."""
    dom = conn.lookupByName(domain)
    old_id = dom.ID()
    started = time.monotonic()
    dom.destroy()
    while time.monotonic() - started < HEAL_TIMEOUT_S:
        state = dom.state()[0]
        if state == libvirt.VIR_DOMAIN_RUNNING and dom.ID() != old_id:
            return time.monotonic() - started
        time.sleep(POLL_S)
    raise guests.BenchError(f"{domain} not running again {HEAL_TIMEOUT_S:.0f} s after destroy")


def raw_restart_seconds(conn: libvirt.virConnect, domain: str) -> float:
    """The floor of any healing: a script's destroy + start of a foreign twin domain."""
    dom = conn.lookupByName(domain)
    started = time.monotonic()
    dom.destroy()
    dom.create()
    return time.monotonic() - started


def run(ctx: BenchContext) -> ScenarioResult:
    tries = 3 if ctx.small else 20
    namespace = guests.unique("bench-drift")
    api = guests.api_client(ctx.env)
    guests.ensure_namespace(api, namespace)
    names = [f"drift-{i:02d}" for i in range(tries)]
    conn = libvirt.open(guests.node(ctx.env, NODE).uri)
    seconds: list[float] = []
    raw_seconds: list[float] = []
    raw_name = f"{namespace}-raw"
    try:
        with guests.RunningWatch(ctx.env, namespace) as watch:
            for name in names:
                guests.create_vm(api, guests.small_vm(name, namespace, NODE))
            if len(watch.wait_all(names, 180)) < tries:
                raise guests.BenchError("not every drift VM reached Running")
        template = conn.lookupByName(f"{namespace}_{names[0]}").XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE
        )
        guests.raw_start(conn, guests.raw_twin_xml(template, raw_name))
        time.sleep(2)  # let the agent settle (statuses written, no start in flight)
        for name in names:  # interleaved: a noisy moment hits both sides alike
            seconds.append(heal_seconds(conn, f"{namespace}_{name}"))
            time.sleep(0.5)
            raw_seconds.append(raw_restart_seconds(conn, raw_name))
            time.sleep(0.5)
        statuses = [guests.printable_status(api, namespace, n) for n in names]
    finally:
        guests.raw_remove(conn, [raw_name])
        conn.close()
        guests.delete_vms(ctx.env, namespace, names, NODE)
        guests.delete_namespace(api, namespace)

    p50 = report.percentile(seconds, 50)
    raw_p50 = report.percentile(raw_seconds, 50)
    return ScenarioResult(
        name="drift_healing",
        title=f"Drift healing: virsh destroy → running again ({tries} tries)",
        rows=[
            Row("destroy → running again p50", p50, "s", raw_p50, "≤ 1 s", p50 <= 1.0),
            Row(
                "destroy → running again p95",
                report.percentile(seconds, 95),
                "s",
                report.percentile(raw_seconds, 95),
            ),
            Row("destroy → running again max", max(seconds), "s", max(raw_seconds)),
        ],
        samples={"virtfleet (healing)": seconds, "raw destroy+start (script)": raw_seconds},
        notes=[
            f"{tries} small VMs on {NODE}, each destroyed once with libvirt's destroy; "
            "time until libvirt reports the domain running with a new QEMU (10 ms polling).",
            "raw = the floor of any healing: a script's destroy + start of a foreign twin "
            "domain (same XML), interleaved with the tries; nothing in libvirt heals by itself.",
            f"VM statuses afterwards: {sorted(set(map(str, statuses)))}",
        ],
    )
