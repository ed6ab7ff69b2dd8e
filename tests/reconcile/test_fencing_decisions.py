"""The fencing rules of both sides, without a cluster: the node's (self-fence, holds,
watchdog) and the controller's (failed, fenced, recovering, damping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from virtfleet.api.vmhost import NodeHealthState
from virtfleet.reconcile import node_fencing as nf
from virtfleet.reconcile import node_health as nh

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
SFA = 10.0


def state(
    last: float | None = 100.0, *, fenced: bool = False, recovering: bool = False
) -> nf.LeaseState:
    return nf.LeaseState(last_sent=last, fenced=fenced, recovering=recovering)


# --- the node's side -------------------------------------------------------------------


def test_ha_vms_start_only_while_the_lease_holds_with_a_margin() -> None:
    assert nf.start_hold(state(), 100.0 + SFA - nf.START_MARGIN_SECONDS - 0.1, SFA) is None
    assert "could not be renewed" in (nf.start_hold(state(), 100.0 + SFA - 1, SFA) or "")
    assert "not been renewed yet" in (nf.start_hold(state(None), 0.0, SFA) or "")
    assert "fenced" in (nf.start_hold(state(fenced=True), 100.5, SFA) or "")
    # After a fence mark is cleared, nothing starts until the VMs were read afresh.
    assert "fenced" in (nf.start_hold(state(recovering=True), 100.5, SFA) or "")
    # No self-fencing configured: no lease-based hold either (the node is never fenced).
    assert nf.start_hold(state(None), 0.0, None) is None


def test_self_fence_when_the_lease_lapses_or_the_controller_fenced() -> None:
    assert not nf.must_self_fence(state(), 100.0 + SFA - 0.01, SFA)
    assert nf.must_self_fence(state(), 100.0 + SFA, SFA)
    assert nf.must_self_fence(state(fenced=True), 100.1, SFA)
    # No renewal known (the Lease unreadable at start): what runs is not covered any more.
    assert nf.must_self_fence(state(None), 0.0, SFA)
    assert not nf.must_self_fence(state(), 1e9, None)


@pytest.mark.parametrize(
    ("now", "ha_active", "pet"),
    [
        (105.0, None, True),  # the lease holds: pet
        (111.0, 0, True),  # lapsed, every HA domain destroyed: pet (the node is safe)
        (111.0, 1, False),  # lapsed, one still runs: let the watchdog reset the node
        (111.0, None, False),  # lapsed, libvirtd does not answer: reset
    ],
)
def test_the_watchdog_is_petted_only_while_the_node_keeps_its_promise(
    now: float, ha_active: int | None, pet: bool
) -> None:
    assert nf.pet_watchdog(state(), now, SFA, ha_active) is pet


def test_the_controller_fences_only_after_the_nodes_own_deadline() -> None:
    """Renewal sent at agent time t ≤ the controller's sighting s. The agent has fenced
    itself by t + sfa, its watchdog by t + sfa + wd; the controller fences at s + sfa +
    wd + margin: later than both, whatever the transport delay."""
    lease = make_lease(seen=T0)
    settings = nh.HealthSettings(fence_margin=2.0)
    deadline = lease.fence_deadline(settings)
    assert deadline == T0 + timedelta(seconds=10 + 5 + 2)


# --- the controller's side -----------------------------------------------------------------


def make_lease(
    *,
    seen: datetime = T0,
    renew: str = "r1",
    mark: nh.FenceMark | None = None,
    watchdog: float | None = 5.0,
    sfa: float | None = 10.0,
) -> nh.LeaseView:
    return nh.LeaseView(
        node="node-a",
        resource_version="7",
        renew_time=renew,
        seen=seen,
        duration=10.0,
        self_fence_after=sfa,
        watchdog_timeout=watchdog,
        mark=mark,
    )


def judge(lease: nh.LeaseView, after: float, **kwargs: Any) -> nh.Verdict:
    memory = kwargs.pop("memory", nh.NodeMemory())
    return nh.judge(
        lease,
        T0 + timedelta(seconds=after),
        out_of_service=kwargs.pop("out_of_service", False),
        memory=memory,
        settings=nh.HealthSettings(),
        disruption=kwargs.pop("disruption", False),
    )


def test_a_node_goes_healthy_failed_then_fenced_at_its_deadline() -> None:
    lease = make_lease()
    assert judge(lease, 9).state is NodeHealthState.HEALTHY
    failed = judge(lease, 11)
    assert failed.state is NodeHealthState.FAILED
    assert failed.fence is None
    assert failed.recheck_after == pytest.approx(6.0)
    fence = judge(lease, 17).fence
    assert fence is not None
    assert fence.renew_time == "r1"  # the renewal it fenced after
    assert "watchdog" in fence.reason


def test_a_node_without_a_watchdog_waits_for_the_out_of_service_taint() -> None:
    lease = make_lease(watchdog=None)
    verdict = judge(lease, 3600)
    assert verdict.reason == "NoFencing"
    assert verdict.fence is None
    assert "out-of-service" in verdict.message
    tainted = judge(lease, 12, out_of_service=True)
    assert tainted.fence is not None
    assert "out-of-service" in tainted.fence.reason
    assert judge(lease, 5, out_of_service=True).fence is None  # renewing: not failed at all


def test_an_agent_back_then_silent_again_before_the_clear_is_fenced_anew() -> None:
    mark = nh.FenceMark(T0 + timedelta(seconds=17), "r1", "deadline")
    back_then_gone = make_lease(mark=mark, renew="r2", seen=T0 + timedelta(seconds=60))
    assert judge(back_then_gone, 65).clear_mark
    verdict = judge(back_then_gone, 60 + 23)
    assert verdict.fence is not None
    assert verdict.fence.renew_time == "r2"  # a new mark: this silence's


def test_fenced_until_the_agent_renews_then_the_mark_is_cleared() -> None:
    mark = nh.FenceMark(T0 + timedelta(seconds=17), "r1", "deadline")
    fenced = make_lease(mark=mark)
    assert judge(fenced, 30).state is NodeHealthState.FENCED
    assert not fenced.back_after_fence
    back = make_lease(mark=mark, renew="r2", seen=T0 + timedelta(seconds=60))
    verdict = judge(back, 61)
    assert verdict.state is NodeHealthState.RECOVERING
    assert verdict.clear_mark


def test_a_flapping_node_is_damped_longer_each_time() -> None:
    settings = nh.HealthSettings(damping_base=30, damping_window=600, damping_max=600)
    memory = nh.NodeMemory()
    holds = []
    for i in range(4):
        at = T0 + timedelta(seconds=100 * i)
        memory = nh.after_fence(memory, at, settings)
        memory = nh.after_recovery(memory, at, settings)
        assert memory.placeable_after is not None
        holds.append((memory.placeable_after - at).total_seconds())
    assert holds == [30, 60, 120, 240]
    lease = make_lease(seen=T0 + timedelta(seconds=300))
    damped = judge(lease, 301, memory=memory)
    assert damped.state is NodeHealthState.RECOVERING
    assert damped.reason == "Damped"
    # Failures older than the window no longer count.
    later = nh.after_fence(memory, T0 + timedelta(seconds=2000), settings)
    assert len(later.failures) == 1


def test_the_fence_mark_round_trips_and_a_garbled_one_still_fences() -> None:
    mark = nh.FenceMark(T0, "r9", "why")
    assert nh.FenceMark.decode(mark.encode()) == mark
    garbled = nh.FenceMark.decode("not json")
    assert garbled is not None
    assert garbled.renew_time is None


def test_a_lease_sighting_moves_only_when_the_renewal_changes() -> None:
    body: dict[str, Any] = {
        "metadata": {
            "name": "virtfleet-agent-node-a",
            "resourceVersion": "5",
            "annotations": {nf.SELF_FENCE_ANNOTATION: "10", nf.WATCHDOG_ANNOTATION: "5"},
        },
        "spec": {"renewTime": "2026-12-07T12:00:00.000000Z", "leaseDurationSeconds": 10},
    }
    first = nh.LeaseView.from_body(body, T0, None)
    assert first is not None
    assert first.node == "node-a"
    assert first.watchdog_timeout == 5.0
    same = nh.LeaseView.from_body(body, T0 + timedelta(seconds=8), first)
    assert same is not None
    assert same.seen == T0
    body["spec"]["renewTime"] = "2026-12-07T12:00:02.000000Z"
    moved = nh.LeaseView.from_body(body, T0 + timedelta(seconds=9), same)
    assert moved is not None
    assert moved.seen == T0 + timedelta(seconds=9)
    assert nh.LeaseView.from_body({"metadata": {"name": "node-a"}}, T0, None) is None


def test_most_nodes_silent_at_once_is_a_disruption_not_a_fence() -> None:
    one = make_lease()
    fresh = nh.LeaseView(**{**one.__dict__, "node": "node-b", "seen": T0 + timedelta(seconds=30)})
    at = T0 + timedelta(seconds=30)
    assert not nh.disrupted([one, fresh], at)  # one of two: an ordinary failure
    assert nh.disrupted([one, one, fresh], at)  # two of three
    verdict = judge(one, 30, disruption=True)
    assert verdict.reason == "ClusterDisruption"
    assert verdict.fence is None


def test_a_node_dead_for_long_does_not_make_a_new_failure_a_disruption() -> None:
    long_dead = nh.LeaseView(
        **{**make_lease().__dict__, "node": "old", "seen": T0 - timedelta(hours=1)}
    )
    failing = make_lease()
    fresh = nh.LeaseView(
        **{**failing.__dict__, "node": "node-b", "seen": T0 + timedelta(seconds=30)}
    )
    assert not nh.disrupted([long_dead, failing, fresh], T0 + timedelta(seconds=30))
