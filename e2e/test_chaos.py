"""Chaos: SIGKILLs at random moments under a workload, then every invariant is checked.

For ``$VIRTFLEET_CHAOS_SECONDS`` (default 180, the CI variant; ``make chaos`` runs 900)
a seeded workload creates, updates, deletes, snapshots, restores and migrates VMs on
both nodes while a seeded injector SIGKILLs the agents, the controller and the
kube-apiserver and restarts node-a's libvirtd. Then everything is brought back and the
system must converge: see :mod:`harness.chaos_invariants` for the list. The seed is
printed; ``VIRTFLEET_CHAOS_SEED=<seed>`` replays the same schedule.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from harness import chaos, chaos_invariants
from harness.testing import Cluster

#: Faults the run injects at least (it runs on past the duration until it has).
MIN_FAULTS = 50
CONVERGE_TIMEOUT_S = 300.0


@pytest.mark.chaos
def test_chaos_keeps_every_invariant(system: Cluster, namespace: str) -> None:
    seed = chaos.seed_from_env()
    duration = float(os.environ.get("VIRTFLEET_CHAOS_SECONDS") or 180)
    print(f"\n[chaos] seed {seed} (replay: VIRTFLEET_CHAOS_SEED={seed}), {duration:.0f}s")
    root = random.Random(seed)
    stop = threading.Event()
    injector = chaos.FaultInjector(system, random.Random(root.random()), stop)
    injector.min_faults = MIN_FAULTS
    workload = chaos.Workload(system, namespace, random.Random(root.random()), stop)

    started = time.monotonic()
    workload.start()
    injector.start()
    try:
        time.sleep(duration)
    finally:
        stop.set()
        workload.join(timeout=180)
        injector.join(timeout=300)
        chaos.restore_everything(system)
    chaos_seconds = time.monotonic() - started

    converge_started = time.monotonic()
    deadline = converge_started + CONVERGE_TIMEOUT_S
    operator = chaos_invariants.StuckJobOperator(system, namespace)
    problems = chaos_invariants.violations(system, workload)
    while problems and time.monotonic() < deadline:
        time.sleep(3)
        operator.step(time.monotonic())
        problems = chaos_invariants.violations(system, workload)
    converged = time.monotonic() - converge_started

    faults = sum(injector.counts.values())
    print(f"[chaos] seed {seed}: {chaos_seconds:.0f}s of chaos, converged in {converged:.0f}s")
    print(f"[chaos] faults injected: {faults} {dict(sorted(injector.counts.items()))}")
    operations = dict(sorted(workload.counts.items()))
    print(f"[chaos] operations: {sum(operations.values())} {operations}")
    print(f"[chaos] operations given up (apiserver away > 60s): {dict(workload.failures)}")
    print(f"[chaos] outcomes: {chaos_invariants.acted(system, workload)}")
    print(f"[chaos] libvirtd restarted for {chaos_invariants.JOB_STUCK}: {dict(operator.restarts)}")
    print(f"[chaos] violations: {len(problems)}")
    for line in problems:
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
