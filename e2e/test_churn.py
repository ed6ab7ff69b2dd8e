"""Churn: hundreds of VMs created, updated and deleted in rounds on a test-driver node.

Proves two things about the agent under sustained work (issue #8):

* nothing gets stuck: in every round every VM reaches Running, then Stopped after its
  run strategy is set to Halted, then is gone after its deletion (the agent released
  its finalizer), and finally the node's VMHost counts no VM;
* its memory stays flat: the agent's RSS is sampled every 0.5 s. The first rounds are
  warm-up (``WARMUP_ROUNDS``: caches and pymalloc arenas reach their working size;
  measured here, 100-VM rounds grow the RSS by ~10 MiB over the first two or three
  rounds, then by ~1 MiB per round and less). Over the remaining rounds the
  least-squares slope is reported in MiB per 1,000 operations, and the check is that
  the median RSS of the last third of the samples is at most ``RSS_GROWTH_LIMIT_MIB``
  above the median of the first third. Medians of thirds are robust against the
  sawtooth within a round (a round's peak is freed at its end) and against single
  outliers; a slope over a few rounds would be dominated by that sawtooth's phase.
  The quick run can only catch gross leaks (see ``RSS_GROWTH_LIMIT_MIB``); ``make soak``
  runs 6,000+ operations after warm-up, where 2 KiB per operation already fails.

Quick variant in the normal run (100 VMs × 5 rounds, about 1.5 minutes); the long one is
``make soak`` (``VIRTFLEET_CHURN_VMS``, ``VIRTFLEET_CHURN_ROUNDS``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from harness import fleet, testdriver
from harness.testing import Cluster, wait_for

VMS = int(os.environ.get("VIRTFLEET_CHURN_VMS", "100"))
ROUNDS = int(os.environ.get("VIRTFLEET_CHURN_ROUNDS", "5"))
WARMUP_ROUNDS = max(2, ROUNDS // 5)
#: 16 MiB over the quick run's ~900 measured operations is ~18 KiB per operation: what
#: keeping one VM body (a parsed object with managedFields) per operation would cost, the
#: leak class that matters. The soak's thousands of operations make it a far finer sieve.
RSS_GROWTH_LIMIT_MIB = float(os.environ.get("VIRTFLEET_CHURN_RSS_LIMIT_MIB", "16"))
#: Per phase of a round; the test driver needs milliseconds per VM, this is for a busy box.
PHASE_TIMEOUT_S = 60.0 + VMS * 0.3
HALT = {"spec": {"runStrategy": "Halted"}}


def is_stopped(vm: Mapping[str, Any]) -> bool:
    return bool((vm.get("status") or {}).get("printableStatus") == "Stopped")


def running_and_ready(vm: Mapping[str, Any]) -> bool:
    return fleet.is_running(vm) and fleet.is_ready(vm)


def test_churn_leaves_nothing_stuck_and_memory_flat(system: Cluster) -> None:
    assert ROUNDS >= WARMUP_ROUNDS + 2, f"the first {WARMUP_ROUNDS} rounds are warm-up"
    with testdriver.bench_fleet(
        system.state_dir, system.env, capacity_vms=VMS, prefix="churn"
    ) as bench:
        api, namespace = bench.api, bench.namespace
        pid = bench.td.pid()
        assert pid is not None
        sampler = testdriver.RssSampler(pid).start()
        watch = fleet.VmWatch(api, namespace).start()
        operations = 0
        round_starts: list[tuple[float, int]] = []  # (time, operations before the round)
        try:
            for round_no in range(ROUNDS):
                round_starts.append((time.monotonic(), operations))
                names = [f"r{round_no}-vm-{i:03d}" for i in range(VMS)]

                watch.reset(predicate=running_and_ready)
                fleet.create_many(api, namespace, bench.manifests(names))
                assert watch.wait_all(names, PHASE_TIMEOUT_S), (
                    f"round {round_no}: {watch.count_seen(names)}/{VMS} Running"
                )

                watch.reset(predicate=is_stopped)
                fleet.run_parallel(lambda n: fleet.patch(api, namespace, n, HALT), names)
                assert watch.wait_all(names, PHASE_TIMEOUT_S), (
                    f"round {round_no}: {watch.count_seen(names)}/{VMS} Stopped"
                )

                fleet.run_parallel(lambda n: fleet.delete(api, namespace, n), names)
                assert watch.wait_deleted(names, PHASE_TIMEOUT_S), (
                    f"round {round_no}: stuck: "
                    f"{[vm['metadata']['name'] for vm in fleet.list_vms(api, namespace)][:5]}"
                )
                operations += 3 * VMS
        finally:
            samples = sampler.stop()
            watch.stop()

        assert fleet.list_vms(api, namespace) == []
        wait_for(
            lambda: _vm_count(system, bench.td.name) == 0,
            30,
            0.5,
            "the fake node's VMHost to count no VM",
        )

    warm_end, warm_ops = round_starts[WARMUP_ROUNDS]
    steady = [(t, mib) for t, mib in samples if t >= warm_end]
    assert len(steady) >= 6, "too few RSS samples"
    ops_per_second = (operations - warm_ops) / (steady[-1][0] - warm_end)
    per_op = [((t - warm_end) * ops_per_second, mib) for t, mib in steady]
    slope_per_1000 = fleet.slope(per_op) * 1000
    third = len(steady) // 3
    first = fleet.median([mib for _, mib in steady[:third]])
    last = fleet.median([mib for _, mib in steady[-third:]])
    print(
        f"\nchurn: {VMS} VMs x {ROUNDS} rounds, {operations} operations; agent RSS "
        f"{steady[0][1]:.1f} → {steady[-1][1]:.1f} MiB (peak "
        f"{max(m for _, m in samples):.1f}); slope after warm-up {slope_per_1000:+.2f} MiB per "
        f"1,000 operations; median first third {first:.1f} MiB, last third {last:.1f} MiB"
    )
    assert last - first <= RSS_GROWTH_LIMIT_MIB, (
        f"agent RSS grew by {last - first:.1f} MiB over {operations - warm_ops} operations "
        f"(slope {slope_per_1000:+.2f} MiB/1,000 operations)"
    )


def _vm_count(system: Cluster, node: str) -> int | None:
    out = system.kubectl("get", "vmhost", node, "-o", "jsonpath={.status.vmCount}", check=False)
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else None
