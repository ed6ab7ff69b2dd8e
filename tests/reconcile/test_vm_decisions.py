"""The node agent's policy for one VM, as a pure function: run strategies, drift, deletion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from virtfleet.api.conditions import Condition, ConditionStatus
from virtfleet.api.virtualmachine import PrintableStatus, VirtualMachineSpec, VirtualMachineStatus
from virtfleet.identity import derive_mac, is_derived_range
from virtfleet.reconcile.vm import (
    ApplyLive,
    Decision,
    Define,
    DeleteVolumes,
    EnsureVolumes,
    Observed,
    Pause,
    Power,
    PowerRequest,
    Resume,
    Start,
    Stop,
    StopCause,
    Undefine,
    VmView,
    decide,
    failed,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
UID = "8c954d72-e2b0-50c1-9ac5-db3a5403563f"


def ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def view(
    *,
    strategy: str = "Always",
    status: dict[str, Any] | None = None,
    deleting: bool = False,
    generation: int = 1,
    **spec: Any,
) -> VmView:
    return VmView(
        namespace="ns",
        name="vm",
        uid=UID,
        generation=generation,
        node="node-a",
        spec=VirtualMachineSpec.model_validate(
            {"memory": {"size": "64Mi"}, "runStrategy": strategy, **spec}
        ),
        status=VirtualMachineStatus.model_validate(status or {}),
        deleting=deleting,
    )


def started(seconds_ago: float = 600, **extra: Any) -> dict[str, Any]:
    """Status of a VM the agent started ``seconds_ago``."""
    return {"lastStartTime": ts(NOW - timedelta(seconds=seconds_ago)), "domainUUID": UID, **extra}


RUNNING = Observed(defined=True, power=Power.RUNNING)


def stopped(cause: StopCause) -> Observed:
    return Observed(defined=True, power=Power.STOPPED, stop_cause=cause)


def kinds(decision: Decision) -> list[type]:
    return [type(a) for a in decision.actions]


def condition(decision: Decision, kind: str) -> Condition | None:
    return next((c for c in decision.status.conditions if c.type == kind), None)


def ready(decision: Decision) -> ConditionStatus:
    found = condition(decision, "Ready")
    assert found is not None
    return found.status


class TestCreation:
    def test_new_vm_gets_volumes_a_domain_and_a_start(self) -> None:
        d = decide(view(), Observed(defined=False, missing_volumes=("root",)), NOW)
        assert kinds(d) == [EnsureVolumes, Define, Start]
        assert d.status.printable_status is PrintableStatus.STARTING
        assert ready(d) is ConditionStatus.FALSE
        assert condition(d, "Reconciling") is not None
        assert d.status.last_start_time == ts(NOW)
        assert d.status.restart_count == 0
        assert d.events == ()  # a normal creation is not news

    def test_converged_running_vm_is_ready_and_quiet(self) -> None:
        d = decide(view(status=started()), RUNNING, NOW)
        assert d.actions == ()
        assert d.status.printable_status is PrintableStatus.RUNNING
        assert ready(d) is ConditionStatus.TRUE
        assert condition(d, "Reconciling") is None
        assert condition(d, "Stalled") is None
        assert d.status.observed_generation == 1
        assert d.status.domain_uuid == UID
        assert d.status.node_name == "node-a"

    def test_interfaces_report_derived_macs(self) -> None:
        d = decide(view(status=started(), interfaces=[{"name": "nic0"}]), RUNNING, NOW)
        # Derived MACs are in the range the API reserves for them (first octet x e).
        assert [(i.name, i.mac) for i in d.status.interfaces] == [("nic0", derive_mac(UID, "nic0"))]
        assert is_derived_range(d.status.interfaces[0].mac)


class TestRunStrategies:
    def test_halted_running_vm_is_stopped_gracefully(self) -> None:
        d = decide(
            view(strategy="Halted", terminationGracePeriodSeconds=7, status=started()), RUNNING, NOW
        )
        assert d.actions == (Stop(7, "runStrategy is Halted"),)

    def test_halted_stopped_vm_is_ready(self) -> None:
        d = decide(view(strategy="Halted"), stopped(StopCause.NONE), NOW)
        assert d.actions == ()
        assert d.status.printable_status is PrintableStatus.STOPPED
        assert ready(d) is ConditionStatus.TRUE

    @pytest.mark.parametrize("cause", list(StopCause))
    def test_always_restarts_whatever_the_cause(self, cause: StopCause) -> None:
        d = decide(view(status=started()), stopped(cause), NOW)
        assert kinds(d) == [Start]
        assert d.status.restart_count == 1
        assert [e.reason for e in d.events] == ["Restarted"]

    def test_rerun_on_failure_keeps_a_clean_poweroff(self) -> None:
        d = decide(view(strategy="RerunOnFailure", status=started()), stopped(StopCause.GUEST), NOW)
        assert d.actions == ()
        assert d.status.printable_status is PrintableStatus.STOPPED
        assert ready(d) is ConditionStatus.TRUE

    @pytest.mark.parametrize("cause", [StopCause.DESTROYED, StopCause.CRASHED, StopCause.FAILED])
    def test_rerun_on_failure_restarts_after_a_failure(self, cause: StopCause) -> None:
        d = decide(view(strategy="RerunOnFailure", status=started()), stopped(cause), NOW)
        assert kinds(d) == [Start]
        assert d.events[0].type == "Warning"

    def test_once_starts_once(self) -> None:
        assert kinds(decide(view(strategy="Once"), Observed(defined=True), NOW)) == [Start]
        d = decide(view(strategy="Once", status=started()), stopped(StopCause.GUEST), NOW)
        assert d.actions == ()

    def test_manual_never_changes_power(self) -> None:
        assert decide(view(strategy="Manual"), Observed(defined=True), NOW).actions == ()
        assert decide(view(strategy="Manual", status=started()), RUNNING, NOW).actions == ()

    def test_shutting_down_is_waited_for(self) -> None:
        d = decide(
            view(strategy="Halted", status=started()),
            Observed(defined=True, power=Power.STOPPING),
            NOW,
        )
        assert d.actions == ()
        assert d.requeue_after is not None
        assert d.status.printable_status is PrintableStatus.STOPPING

    def test_paused_vm_is_reported_not_resumed(self) -> None:
        d = decide(view(status=started()), Observed(defined=True, power=Power.PAUSED), NOW)
        assert d.actions == ()
        assert d.status.printable_status is PrintableStatus.PAUSED
        paused = condition(d, "Paused")
        assert paused is not None
        assert paused.status is ConditionStatus.TRUE


class TestCrashLoop:
    def test_first_quick_stop_restarts_at_once(self) -> None:
        d = decide(view(status=started(seconds_ago=5)), stopped(StopCause.GUEST), NOW)
        assert kinds(d) == [Start]
        assert d.status.consecutive_failures == 1

    def test_repeated_quick_stops_back_off(self) -> None:
        status = started(seconds_ago=5, consecutiveFailures=1, restartCount=1)
        d = decide(view(status=status), stopped(StopCause.GUEST), NOW)
        assert d.actions == ()
        assert d.status.printable_status is PrintableStatus.CRASH_LOOP_BACK_OFF
        assert d.status.consecutive_failures == 2
        assert d.requeue_after == 10
        assert d.status.crash_loop_retry_time == ts(NOW + timedelta(seconds=10))
        assert ready(d) is ConditionStatus.FALSE
        assert d.events[0].reason == "CrashLoopBackOff"

        waiting = decide(
            view(status=d.status.to_wire()), stopped(StopCause.GUEST), NOW + timedelta(seconds=4)
        )
        assert waiting.actions == ()
        assert waiting.requeue_after == 6
        assert waiting.status.consecutive_failures == 2  # not counted twice

        later = NOW + timedelta(seconds=10)
        retry = decide(view(status=d.status.to_wire()), stopped(StopCause.GUEST), later)
        assert kinds(retry) == [Start]
        assert retry.status.crash_loop_retry_time is None
        assert retry.status.restart_count == 2

    def test_back_off_doubles_and_is_capped(self) -> None:
        status = started(seconds_ago=5, consecutiveFailures=20)
        d = decide(view(status=status), stopped(StopCause.CRASHED), NOW)
        assert d.requeue_after == 300

    def test_a_long_run_resets_the_count(self) -> None:
        d = decide(view(status=started(seconds_ago=600, consecutiveFailures=4)), RUNNING, NOW)
        assert d.status.consecutive_failures == 0
        restart = decide(
            view(status=started(seconds_ago=600, consecutiveFailures=4)),
            stopped(StopCause.GUEST),
            NOW,
        )
        assert kinds(restart) == [Start]
        assert restart.status.consecutive_failures == 1


class TestDrift:
    def test_undefined_domain_is_defined_again_with_an_event(self) -> None:
        d = decide(view(status=started()), Observed(defined=False), NOW)
        assert kinds(d) == [Define, Start]
        assert [e.reason for e in d.events] == ["DomainRedefined", "Restarted"]

    def test_running_domain_whose_definition_was_removed_is_defined_again(self) -> None:
        obs = Observed(defined=True, persistent=False, power=Power.RUNNING)
        d = decide(view(status=started()), obs, NOW)
        assert kinds(d) == [Define]
        assert d.events[0].reason == "DomainRedefined"

    def test_edited_definition_is_restored_with_an_event(self) -> None:
        d = decide(
            view(status=started()),
            Observed(defined=True, power=Power.RUNNING, drift=("memory.size",)),
            NOW,
        )
        assert d.actions == (Define("drift"),)
        assert d.events[0].reason == "DriftCorrected"
        assert "memory.size" in d.events[0].message

    def test_spec_change_redefines_quietly(self) -> None:
        obs = Observed(
            defined=True, power=Power.RUNNING, drift=("cpu.cores",), marker_current=False
        )
        d = decide(view(status=started(), generation=2), obs, NOW)
        assert d.actions == (Define("spec changed"),)
        assert d.events == ()

    def test_restart_required_names_the_fields_and_never_restarts(self) -> None:
        obs = Observed(
            defined=True, power=Power.RUNNING, restart_changes=("memory.size", "cpu.cores")
        )
        d = decide(view(status=started()), obs, NOW)
        assert d.actions == ()
        rr = condition(d, "RestartRequired")
        assert rr is not None
        assert rr.status is ConditionStatus.TRUE
        assert "memory.size, cpu.cores" in rr.message
        assert ready(d) is ConditionStatus.TRUE

    def test_restart_required_clears_once_stopped(self) -> None:
        obs = Observed(defined=True, power=Power.RUNNING, restart_changes=("memory.size",))
        first = decide(view(status=started()), obs, NOW)
        after = decide(
            view(strategy="Halted", status=first.status.to_wire()), Observed(defined=True), NOW
        )
        assert condition(after, "RestartRequired") is None

    def test_live_changes_are_applied_live(self) -> None:
        obs = Observed(defined=True, power=Power.RUNNING, live_changes=("disks[root].iotune",))
        d = decide(view(status=started()), obs, NOW)
        assert d.actions == (ApplyLive(("disks[root].iotune",)),)

    def test_missing_volume_of_a_defined_domain_is_recreated_with_an_event(self) -> None:
        obs = Observed(defined=True, power=Power.STOPPED, missing_volumes=("data",))
        d = decide(view(strategy="Halted", status=started()), obs, NOW)
        assert d.actions == (EnsureVolumes(("data",)),)
        assert d.events[0].reason == "VolumesRecreated"


class TestDeletion:
    def test_running_vm_is_stopped_undefined_and_its_volumes_removed(self) -> None:
        d = decide(
            view(deleting=True, terminationGracePeriodSeconds=3, status=started()), RUNNING, NOW
        )
        assert kinds(d) == [Stop, Undefine, DeleteVolumes]
        assert d.actions[0] == Stop(3, "the VirtualMachine is being deleted")
        assert d.finalized
        assert d.status.printable_status is PrintableStatus.TERMINATING

    def test_gone_domain_still_cleans_volumes(self) -> None:
        d = decide(view(deleting=True), Observed(defined=False), NOW)
        assert kinds(d) == [DeleteVolumes]
        assert d.finalized


class TestStalled:
    def test_invalid_spec_stalls_without_touching_anything(self) -> None:
        vm = VmView(
            namespace="ns",
            name="vm",
            uid=UID,
            generation=3,
            node="node-a",
            spec=None,
            status=VirtualMachineStatus(),
            invalid="spec.memory.size: must be at least 16Mi",
        )
        d = decide(vm, RUNNING, NOW)
        assert d.actions == ()
        stalled = condition(d, "Stalled")
        assert stalled is not None
        assert stalled.status is ConditionStatus.TRUE
        assert "16Mi" in stalled.message
        assert d.status.observed_generation == 3

    def test_permanent_failure_stalls_transient_reconciles(self) -> None:
        vm = view(status=started())
        permanent = failed(vm, "ImageNotFound", "no image 'x' on node-a", permanent=True, now=NOW)
        assert permanent.printable_status is PrintableStatus.FAILED
        assert any(
            c.type == "Stalled" and c.reason == "ImageNotFound" for c in permanent.conditions
        )
        transient = failed(vm, "HypervisorUnavailable", "libvirt is down", permanent=False, now=NOW)
        assert any(c.type == "Reconciling" for c in transient.conditions)
        assert not any(c.type == "Stalled" for c in transient.conditions)


def test_decisions_are_deterministic() -> None:
    obs = Observed(defined=False, missing_volumes=("root",))
    assert decide(view(), obs, NOW) == decide(view(), obs, NOW)


class TestPowerRequests:
    def request(self, action: str, strategy: str = "Manual", **status: Any) -> VmView:
        base = view(strategy=strategy, status=started(**status))
        return VmView(**{**base.__dict__, "power_request": PowerRequest(action, "r1")})

    def test_start_and_stop_act_on_manual_vms_once(self) -> None:
        d = decide(self.request("start"), stopped(StopCause.GUEST), NOW)
        assert kinds(d) == [Start]
        assert d.status.last_power_request == "r1"
        again = decide(
            VmView(**{**self.request("start").__dict__, "status": d.status}), RUNNING, NOW
        )
        assert again.actions == ()  # handled once

        stop = decide(self.request("stop"), RUNNING, NOW)
        assert kinds(stop) == [Stop]

    def test_start_stop_on_always_are_refused_with_a_reason(self) -> None:
        d = decide(self.request("stop", strategy="Always"), RUNNING, NOW)
        assert d.actions == ()
        assert d.events[0].reason == "PowerRequestIgnored"
        assert "runStrategy Always" in d.events[0].message
        assert d.status.last_power_request == "r1"

    def test_restart_pause_unpause(self) -> None:
        assert kinds(decide(self.request("restart", strategy="Always"), RUNNING, NOW)) == [
            Stop,
            Start,
        ]
        assert kinds(decide(self.request("pause", strategy="Always"), RUNNING, NOW)) == [Pause]
        paused = Observed(defined=True, power=Power.PAUSED)
        assert kinds(decide(self.request("unpause", strategy="Always"), paused, NOW)) == [Resume]

    def test_restart_counts_as_a_restart(self) -> None:
        d = decide(self.request("restart", strategy="Always", restartCount=2), RUNNING, NOW)
        assert d.status.restart_count == 3

    @pytest.mark.parametrize("value", [None, "", "start", "explode/1", "start/"])
    def test_malformed_requests_are_ignored(self, value: str | None) -> None:
        assert PowerRequest.parse(value) is None

    def test_well_formed_request(self) -> None:
        assert PowerRequest.parse("pause/abc") == PowerRequest("pause", "abc")


class TestStartHeld:
    """A restore replacing the VM's disks holds it stopped: no start, by strategy or request."""

    HELD = "its disks are being restored from VMBackup b1"

    def test_always_does_not_start_a_held_vm(self) -> None:
        vm = VmView(**{**view().__dict__, "start_held": self.HELD})
        d = decide(vm, stopped(StopCause.NONE), NOW)
        assert Start not in kinds(d)

    def test_a_start_request_on_a_held_vm_is_ignored_with_the_reason(self) -> None:
        base = view(strategy="Manual")
        request = PowerRequest("start", "r")
        vm = VmView(**{**base.__dict__, "start_held": self.HELD, "power_request": request})
        d = decide(vm, stopped(StopCause.NONE), NOW)
        assert Start not in kinds(d)
        assert any(e.reason == "PowerRequestIgnored" and self.HELD in e.message for e in d.events)

    def test_a_held_vm_that_runs_is_not_stopped_by_the_hold(self) -> None:
        """The hold only keeps a stopped VM stopped; the restore waits for a stop."""
        vm = VmView(**{**view().__dict__, "start_held": self.HELD})
        assert Stop not in kinds(decide(vm, RUNNING, NOW))

    def test_without_a_hold_always_starts(self) -> None:
        assert Start in kinds(decide(view(), stopped(StopCause.NONE), NOW))
