"""What a node agent should do about one VirtualMachine, decided without doing anything.

``decide(vm, observed, now)`` is the whole policy of the node agent: run strategies,
crash-loop back-off, drift correction, restart-required changes, deletion, and the
status and Events that report them. It is a pure function of what the agent read (the
object and the domain), so every rule is unit-tested without a cluster or a hypervisor,
and the same function serves create, update, resume, libvirt events and resync
(DESIGN §3.2: level-triggered).

The agent runs the returned actions in order and then decides again from a fresh
observation, until a pass returns no actions; the status of that last pass is written.
So a decision only has to describe the next step, and a crash between any two actions
is harmless: the next pass sees where things really are.

What it reads and returns is in :mod:`.vm_model`; the status it reports is built by
:mod:`.vm_status`. Both are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from virtfleet.api.conditions import parse_rfc3339, rfc3339
from virtfleet.api.virtualmachine import RunStrategy, VirtualMachineSpec, VirtualMachineStatus
from virtfleet.reconcile.vm_model import (
    Action,
    ApplyLive,
    Decision,
    Define,
    DeleteVolumes,
    EnsureVolumes,
    EventNote,
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
    warning,
)
from virtfleet.reconcile.vm_status import base_status, failed, report, stalled, terminating_status

#: A domain that stops within this long of its start counts as a failed start.
CRASH_WINDOW = timedelta(seconds=60)
#: Back-off before the n-th consecutive restart: BASE * 2**(n-2), capped (n >= 2).
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0
#: How soon to look again while a domain is shutting down on its own.
STOPPING_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class _Power:
    """What the run strategy wants now."""

    run: bool | None  # True: running, False: stopped, None: leave as it is
    start_reason: str = ""
    stop_reason: str = ""
    event: EventNote | None = None
    #: Starting again after the domain had run (counts in restartCount and the back-off).
    restart: bool = False
    stopped_how: str = ""


# --- The decision -------------------------------------------------------------------------


def decide(vm: VmView, observed: Observed, now: datetime) -> Decision:
    """The next step for ``vm`` given its domain, and the status that describes now."""
    if vm.deleting:
        return _decide_deletion(vm, observed, now)
    if vm.spec is None:
        return stalled(vm, now, "InvalidSpec", vm.invalid or "the spec is invalid")

    spec = vm.spec
    actions: list[Action] = []
    events: list[EventNote] = []

    if observed.missing_volumes:
        actions.append(EnsureVolumes(observed.missing_volumes))
        if observed.defined:
            missing = _names(observed.missing_volumes)
            events.append(warning("VolumesRecreated", f"volumes {missing} were missing"))

    if not observed.defined or not observed.persistent:
        reason = "created"
        if vm.status.domain_uuid or not observed.persistent:
            reason = "undefined behind virtfleet's back; defined again"
            events.append(warning("DomainRedefined", f"the domain was {reason}"))
        actions.append(Define(reason))
    elif observed.drift and observed.marker_current:
        changed = _names(observed.drift)
        events.append(
            warning("DriftCorrected", f"{changed} changed behind virtfleet's back; restored")
        )
        actions.append(Define("drift"))
    elif observed.drift or not observed.marker_current:
        actions.append(Define("spec changed"))

    if observed.defined and observed.power is Power.RUNNING and observed.live_changes:
        actions.append(ApplyLive(observed.live_changes))

    status = base_status(vm, spec)
    request = vm.power_request
    if request is not None and request.id != vm.status.last_power_request:
        handled, note = _power_request(vm, spec, observed, request)
        events.append(note)
        status = status.model_copy(update={"last_power_request": request.id})
        if handled:
            actions.extend(handled)
            if any(isinstance(a, Start) for a in handled):
                status = _started(status, now, restarted=vm.status.last_start_time is not None)
            return report(vm, observed, status, actions, events, now, None, False)
    wish = _power(vm, observed)
    requeue: float | None = None
    backing_off = False

    if wish.run is True and not observed.active and vm.start_held:
        pass  # started when the hold ends (its end queues the VM)
    elif wish.run is True and not observed.active:
        status, start_now, requeue = _crash_loop(vm.status, status, wish, now)
        if start_now:
            if wish.event is not None:
                events.append(wish.event)
            actions.append(Start(wish.start_reason))
        else:
            backing_off = True
            events.append(
                warning(
                    "CrashLoopBackOff",
                    f"{wish.stopped_how} {status.consecutive_failures} times in a row soon "
                    f"after starting; next start at {status.crash_loop_retry_time}",
                )
            )
    elif wish.run is False and observed.active and observed.power is not Power.STOPPING:
        actions.append(Stop(spec.termination_grace_period_seconds, wish.stop_reason))
    elif observed.power is Power.STOPPING:
        requeue = STOPPING_POLL_SECONDS

    if observed.power is Power.RUNNING and not _soon_after_start(vm.status, now):
        status = status.model_copy(update={"consecutive_failures": 0})
    return report(vm, observed, status, actions, events, now, requeue, backing_off)


def _power_request(
    vm: VmView, spec: VirtualMachineSpec, observed: Observed, request: PowerRequest
) -> tuple[list[Action], EventNote]:
    """Actions for an imperative request, or none and a Warning saying why not.

    start/stop only make sense where the run strategy does not decide power itself
    (Manual); elsewhere the manifest is the way (GitOps): say so instead of fighting it.
    """
    grace = spec.termination_grace_period_seconds
    strategy = spec.run_strategy
    ignored = f"{request.action} ignored"
    match request.action:
        case "start" | "stop" if strategy is not RunStrategy.MANUAL:
            return [], warning(
                "PowerRequestIgnored",
                f"{ignored}: runStrategy {strategy.value} decides power; change runStrategy "
                "in the manifest, or use Manual for start/stop by hand",
            )
        case "start" | "restart" if vm.start_held:
            return [], warning("PowerRequestIgnored", f"{ignored}: {vm.start_held}")
        case "start":
            if observed.active:
                return [], EventNote("Normal", "PowerRequest", "start: already running")
            return [Start("start requested")], EventNote(
                "Normal", "PowerRequest", "start requested"
            )
        case "stop":
            if not observed.active:
                return [], EventNote("Normal", "PowerRequest", "stop: already stopped")
            return [Stop(grace, "stop requested")], EventNote(
                "Normal", "PowerRequest", "stop requested"
            )
        case "restart":
            if not observed.active:
                return [], warning("PowerRequestIgnored", f"{ignored}: the VM is not running")
            return [Stop(grace, "restart requested"), Start("restart requested")], EventNote(
                "Normal", "PowerRequest", "restart requested"
            )
        case "pause":
            if observed.power is not Power.RUNNING:
                return [], warning("PowerRequestIgnored", f"{ignored}: the VM is not running")
            return [Pause()], EventNote("Normal", "PowerRequest", "pause requested")
        case _:  # unpause
            if observed.power is not Power.PAUSED:
                return [], warning("PowerRequestIgnored", f"{ignored}: the VM is not paused")
            return [Resume()], EventNote("Normal", "PowerRequest", "unpause requested")


def _crash_loop(
    old: VirtualMachineStatus, status: VirtualMachineStatus, wish: _Power, now: datetime
) -> tuple[VirtualMachineStatus, bool, float | None]:
    """Whether to start now, and the start bookkeeping (restarts, failures, back-off)."""
    retry_at = _parse_ts(old.crash_loop_retry_time)
    if retry_at is not None:
        if now < retry_at:  # already counted; still waiting
            return status, False, (retry_at - now).total_seconds()
        return _started(status, now, restarted=wish.restart), True, None
    failures = old.consecutive_failures
    if wish.restart:
        failures = failures + 1 if _soon_after_start(old, now) else 1
    delay = _backoff(failures)
    status = status.model_copy(update={"consecutive_failures": failures})
    if delay > 0:
        retry = rfc3339(now + timedelta(seconds=delay))
        return status.model_copy(update={"crash_loop_retry_time": retry}), False, delay
    return _started(status, now, restarted=wish.restart), True, None


def _started(
    status: VirtualMachineStatus, now: datetime, *, restarted: bool
) -> VirtualMachineStatus:
    return status.model_copy(
        update={
            "last_start_time": rfc3339(now),
            "crash_loop_retry_time": None,
            "restart_count": status.restart_count + (1 if restarted else 0),
        }
    )


def _decide_deletion(vm: VmView, observed: Observed, now: datetime) -> Decision:
    actions: list[Action] = []
    if observed.active:
        grace = vm.spec.termination_grace_period_seconds if vm.spec else 30
        actions.append(Stop(grace, "the VirtualMachine is being deleted"))
    if observed.defined:
        actions.append(Undefine())
    actions.append(DeleteVolumes())
    return Decision(tuple(actions), terminating_status(vm, now), finalized=True)


def _power(vm: VmView, observed: Observed) -> _Power:
    """The run strategy's wish for the power state (KubeVirt's meanings)."""
    assert vm.spec is not None
    strategy = vm.spec.run_strategy
    ever_started = vm.status.last_start_time is not None
    cause = observed.stop_cause
    how = {
        StopCause.GUEST: "the guest powered off",
        StopCause.DESTROYED: "the domain was destroyed behind virtfleet's back",
        StopCause.CRASHED: "the domain crashed",
        StopCause.FAILED: "QEMU failed",
    }.get(cause, "the domain stopped")

    if strategy is RunStrategy.HALTED:
        return _Power(run=False, stop_reason="runStrategy is Halted")
    if strategy is RunStrategy.MANUAL:
        return _Power(run=None)
    if not ever_started:
        return _Power(run=True, start_reason="first start")
    if strategy is RunStrategy.ONCE:
        return _Power(run=None)
    if strategy is RunStrategy.RERUN_ON_FAILURE and cause is StopCause.GUEST:
        return _Power(run=None)  # a clean poweroff is the end of the run
    event = None
    if not observed.active:
        kind = "Warning" if cause.is_failure else "Normal"
        event = EventNote(kind, "Restarted", f"{how}; started again (runStrategy {strategy.value})")
    return _Power(
        run=True,
        start_reason=f"{how} (runStrategy {strategy.value})",
        event=event,
        restart=True,
        stopped_how=how,
    )


# --- Small helpers ------------------------------------------------------------------------


def _parse_ts(text: str | None) -> datetime | None:
    return parse_rfc3339(text) if text else None


def _soon_after_start(status: VirtualMachineStatus, now: datetime) -> bool:
    started = _parse_ts(status.last_start_time)
    return started is not None and now - started < CRASH_WINDOW


def _backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` quick stops in a row: none after the first."""
    if failures <= 1:
        return 0.0
    return float(min(BACKOFF_BASE_SECONDS * 2.0 ** (failures - 2), BACKOFF_MAX_SECONDS))


def _names(paths: tuple[str, ...]) -> str:
    return ", ".join(paths)


__all__ = [
    "Action",
    "ApplyLive",
    "Decision",
    "Define",
    "DeleteVolumes",
    "EnsureVolumes",
    "EventNote",
    "Observed",
    "Pause",
    "Power",
    "PowerRequest",
    "Resume",
    "Start",
    "Stop",
    "StopCause",
    "Undefine",
    "VmView",
    "decide",
    "failed",
]
