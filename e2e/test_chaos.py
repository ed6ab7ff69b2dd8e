"""Chaos: SIGKILLs at random moments under a workload, then every invariant is checked.

For ``$VIRTFLEET_CHAOS_SECONDS`` (default 120, the CI variant; ``make chaos`` runs 900)
a seeded workload creates, updates, deletes, snapshots, restores and migrates VMs on
both nodes. A seeded injector SIGKILLs the agents, the controller and the kube-apiserver
and restarts node-a's libvirtd until the last ``SETTLE_S`` of that time: the workload
goes on in that quiet period, in which whatever it asks must work again. Then
everything is brought back and the system must converge: see
:mod:`harness.chaos_invariants` for the list. How every snapshot, restore and migration
ended is reported per kind, for the chaos and for the quiet period, and enough of what
was not refused by design must have succeeded: most of what the quiet period asked,
half of what the chaos did (:mod:`harness.chaos_outcomes`).
The seed is printed; ``VIRTFLEET_CHAOS_SEED=<seed>`` replays the same schedule.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from harness import chaos, chaos_invariants, chaos_outcomes
from harness.testing import Cluster

#: Faults the run injects at least (it runs on past the fault period until it has).
MIN_FAULTS = 50
CONVERGE_TIMEOUT_S = 300.0


def settle_seconds(duration: float) -> float:
    """The quiet end of the run: long enough for a few of each operation (a migration
    takes ~10 s on this machine), a quarter of the run at most, a minute at most."""
    return min(60.0, duration / 4)


@pytest.mark.chaos
def test_chaos_keeps_every_invariant(system: Cluster, namespace: str) -> None:
    seed = chaos.seed_from_env()
    duration = float(os.environ.get("VIRTFLEET_CHAOS_SECONDS") or 120)
    settle = settle_seconds(duration)
    print(
        f"\n[chaos] seed {seed} (replay: VIRTFLEET_CHAOS_SEED={seed}), {duration:.0f}s, "
        f"the last {settle:.0f}s without faults"
    )
    root = random.Random(seed)
    stop_faults, stop = threading.Event(), threading.Event()
    injector = chaos.FaultInjector(system, random.Random(root.random()), stop_faults)
    injector.min_faults = MIN_FAULTS
    workload = chaos.Workload(system, namespace, random.Random(root.random()), stop)
    observer = chaos_outcomes.Observer(system, namespace)

    started = time.monotonic()
    observer.start()
    workload.start()
    injector.start()
    try:
        time.sleep(duration - settle)
        stop_faults.set()
        injector.join(timeout=300)
        chaos.restore_everything(system)
        workload.faults_over.set()
        quiet_from = time.monotonic()
        time.sleep(max(settle, started + duration - quiet_from))
    finally:
        stop_faults.set()
        stop.set()
        workload.join(timeout=180)
        injector.join(timeout=300)
        chaos.restore_everything(system)
    chaos_seconds, quiet_seconds = quiet_from - started, time.monotonic() - quiet_from

    converge_started = time.monotonic()
    deadline = converge_started + CONVERGE_TIMEOUT_S
    operator = chaos_invariants.StuckJobOperator(system, namespace)
    problems = chaos_invariants.violations(system, workload)
    while problems and time.monotonic() < deadline:
        time.sleep(3)
        operator.step(time.monotonic())
        problems = chaos_invariants.violations(system, workload)
    converged = time.monotonic() - converge_started
    observer.stop.set()
    observer.join(timeout=30)
    assert observer.look(), "the apiserver does not answer after the chaos"
    outcomes = chaos_outcomes.tally(workload, observer)
    short = chaos_outcomes.below_floor(outcomes)

    faults = sum(injector.counts.values())
    print(
        f"[chaos] seed {seed}: {chaos_seconds:.0f}s of faults, {quiet_seconds:.0f}s quiet, "
        f"converged in {converged:.0f}s"
    )
    print(f"[chaos] faults injected: {faults} {dict(sorted(injector.counts.items()))}")
    operations = dict(sorted(workload.counts.items()))
    print(f"[chaos] operations: {sum(operations.values())} {operations}")
    print(f"[chaos] operations given up (apiserver away > 60s): {dict(workload.failures)}")
    for line in chaos_outcomes.summary(outcomes):
        print(f"[chaos] {line}")
    print(f"[chaos] seen in guests and QEMU logs: {chaos_invariants.acted(system, workload)}")
    print(
        f"[chaos] {chaos_invariants.JOB_STUCK}: libvirtd restarted {dict(operator.restarts)}, "
        f"QEMU killed {dict(operator.qemu_kills)}, status files removed "
        f"{dict(operator.status_files_removed)}"
    )
    print(f"[chaos] violations: {len(problems)}; kinds below their completion floor: {len(short)}")
    for line in problems + short:
        print(f"[chaos]   {line}")
    if problems:
        print("[chaos] what the operators logged about them:")
        for line in chaos_invariants.evidence(system, problems):
            print(f"[chaos]   {line}")
    assert not injector.errors, injector.errors
    assert not workload.errors, workload.errors
    assert sum(operations.values()) >= 10
    assert faults >= MIN_FAULTS
    assert not problems, f"seed {seed}: {len(problems)} violations:\n" + "\n".join(problems)
    assert not short, f"seed {seed}: too little progress:\n" + "\n".join(short)
