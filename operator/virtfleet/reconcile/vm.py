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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from virtfleet.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    parse_rfc3339,
    remove_condition,
    rfc3339,
    set_condition,
)
from virtfleet.api.virtualmachine import (
    InterfaceStatus,
    PrintableStatus,
    RunStrategy,
    VirtualMachineSpec,
    VirtualMachineStatus,
)
from virtfleet.identity import POWER_ACTIONS, derive_mac

#: A domain that stops within this long of its start counts as a failed start.
CRASH_WINDOW = timedelta(seconds=60)
#: Back-off before the n-th consecutive restart: BASE * 2**(n-2), capped (n >= 2).
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0
#: How soon to look again while a domain is shutting down on its own.
STOPPING_POLL_SECONDS = 1.0


class Power(StrEnum):
    """The domain's power state, as far as the run strategy cares."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"  # a shutdown is in progress
    STOPPED = "stopped"
    CRASHED = "crashed"


class StopCause(StrEnum):
    """Why a stopped domain stopped (libvirt's shutoff reason, simplified)."""

    NONE = "none"  # never ran, or nothing known
    GUEST = "guest"  # the guest powered off (or an ACPI shutdown completed)
    DESTROYED = "destroyed"  # killed from outside (virsh destroy)
    CRASHED = "crashed"  # QEMU or the guest crashed
    FAILED = "failed"  # QEMU failed to start or died
    MIGRATED = "migrated"
    SAVED = "saved"
    SNAPSHOT = "snapshot"  # stopped by reverting to a disk-only snapshot

    @property
    def is_failure(self) -> bool:
        return self in (StopCause.DESTROYED, StopCause.CRASHED, StopCause.FAILED)


@dataclass(frozen=True)
class VmView:
    """The VirtualMachine as the agent read it."""

    namespace: str
    name: str
    uid: str
    generation: int
    node: str
    spec: VirtualMachineSpec | None
    status: VirtualMachineStatus
    deleting: bool = False
    #: Why ``spec`` could not be used (validation failed in this agent); None when fine.
    invalid: str | None = None
    #: An imperative power request not yet handled (from the power-request annotation).
    power_request: PowerRequest | None = None


@dataclass(frozen=True)
class PowerRequest:
    action: str  # start | stop | restart | pause | unpause
    id: str

    @classmethod
    def parse(cls, value: str | None) -> PowerRequest | None:
        """``"<action>/<id>"``; anything else is ignored (it is not ours to refuse)."""
        if not value or "/" not in value:
            return None
        action, _, request_id = value.partition("/")
        return cls(action, request_id) if action in POWER_ACTIONS and request_id else None


@dataclass(frozen=True)
class Observed:
    """The VM's domain on this node, reduced to what the decisions need."""

    defined: bool
    #: False for a running domain whose definition was removed (it vanishes when it stops).
    persistent: bool = True
    power: Power = Power.STOPPED
    stop_cause: StopCause = StopCause.NONE
    #: Paths where the persistent definition differs from what the spec renders to.
    drift: tuple[str, ...] = ()
    #: Whether the owner marker records this generation (else: redefine, quietly).
    marker_current: bool = True
    #: Paths libvirt can change on the running domain (iotune, bandwidth) that differ.
    live_changes: tuple[str, ...] = ()
    #: Paths that differ between the running domain and the spec and need a reboot.
    restart_changes: tuple[str, ...] = ()
    #: Disk names whose volume (or the cloud-init seed, as ``cloudInit``) is missing.
    missing_volumes: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.defined and self.power in (Power.RUNNING, Power.PAUSED, Power.STOPPING)


# --- Actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsureVolumes:
    """Create the disks (overlay, blank, download) and cloud-init seed that are missing."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Define:
    """(Re)define the domain from the spec; the running guest keeps its current config."""

    reason: str


@dataclass(frozen=True)
class ApplyLive:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Start:
    reason: str


@dataclass(frozen=True)
class Stop:
    """ACPI shutdown, destroy after ``grace_seconds`` (DESIGN §1)."""

    grace_seconds: int
    reason: str


@dataclass(frozen=True)
class Undefine:
    pass


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class DeleteVolumes:
    pass


Action = (
    EnsureVolumes | Define | ApplyLive | Start | Stop | Undefine | DeleteVolumes | Pause | Resume
)


@dataclass(frozen=True)
class EventNote:
    """An Event for ``kubectl describe``: something a user should see."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    status: VirtualMachineStatus
    events: tuple[EventNote, ...] = ()
    #: Look again after this many seconds even without a change (back-off, polling).
    requeue_after: float | None = None
    #: Everything is cleaned up: the node's finalizer may go.
    finalized: bool = False


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
        return _stalled(vm, now, "InvalidSpec", vm.invalid or "the spec is invalid")

    spec = vm.spec
    actions: list[Action] = []
    events: list[EventNote] = []

    if observed.missing_volumes:
        actions.append(EnsureVolumes(observed.missing_volumes))
        if observed.defined:
            missing = _names(observed.missing_volumes)
            events.append(_warning("VolumesRecreated", f"volumes {missing} were missing"))

    if not observed.defined or not observed.persistent:
        reason = "created"
        if vm.status.domain_uuid or not observed.persistent:
            reason = "undefined behind virtfleet's back; defined again"
            events.append(_warning("DomainRedefined", f"the domain was {reason}"))
        actions.append(Define(reason))
    elif observed.drift and observed.marker_current:
        changed = _names(observed.drift)
        events.append(
            _warning("DriftCorrected", f"{changed} changed behind virtfleet's back; restored")
        )
        actions.append(Define("drift"))
    elif observed.drift or not observed.marker_current:
        actions.append(Define("spec changed"))

    if observed.defined and observed.power is Power.RUNNING and observed.live_changes:
        actions.append(ApplyLive(observed.live_changes))

    status = _base_status(vm, spec)
    request = vm.power_request
    if request is not None and request.id != vm.status.last_power_request:
        handled, note = _power_request(vm, spec, observed, request)
        events.append(note)
        status = status.model_copy(update={"last_power_request": request.id})
        if handled:
            actions.extend(handled)
            if any(isinstance(a, Start) for a in handled):
                status = _started(status, now, restarted=vm.status.last_start_time is not None)
            return _report(vm, observed, status, actions, events, now, None, False)
    wish = _power(vm, observed)
    requeue: float | None = None
    backing_off = False

    if wish.run is True and not observed.active:
        status, start_now, requeue = _crash_loop(vm.status, status, wish, now)
        if start_now:
            if wish.event is not None:
                events.append(wish.event)
            actions.append(Start(wish.start_reason))
        else:
            backing_off = True
            events.append(
                _warning(
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
    return _report(vm, observed, status, actions, events, now, requeue, backing_off)


def _report(
    vm: VmView,
    observed: Observed,
    status: VirtualMachineStatus,
    actions: list[Action],
    events: list[EventNote],
    now: datetime,
    requeue: float | None,
    backing_off: bool,
) -> Decision:
    """Printable status and conditions for what was observed and is about to be done."""
    starting = any(isinstance(a, Start) for a in actions)
    printable = _printable(observed, starting=starting, backing_off=backing_off)
    ready = _ready(vm, observed, printable)
    if actions or (requeue is not None and not backing_off):
        reconciling = (True, "Converging", _describe(actions) or "waiting for the domain")
    else:
        reconciling = (False, "", "")
    conditions = _conditions(
        status.conditions, vm.generation, ready=ready, reconciling=reconciling, now=now
    )
    conditions = _restart_required(conditions, observed, vm.generation, now)
    conditions = _paused(conditions, observed, vm.generation, now)
    status = status.model_copy(update={"printable_status": printable, "conditions": conditions})
    return Decision(tuple(actions), status, tuple(events), requeue)


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
            return [], _warning(
                "PowerRequestIgnored",
                f"{ignored}: runStrategy {strategy.value} decides power; change runStrategy "
                "in the manifest, or use Manual for start/stop by hand",
            )
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
                return [], _warning("PowerRequestIgnored", f"{ignored}: the VM is not running")
            return [Stop(grace, "restart requested"), Start("restart requested")], EventNote(
                "Normal", "PowerRequest", "restart requested"
            )
        case "pause":
            if observed.power is not Power.RUNNING:
                return [], _warning("PowerRequestIgnored", f"{ignored}: the VM is not running")
            return [Pause()], EventNote("Normal", "PowerRequest", "pause requested")
        case _:  # unpause
            if observed.power is not Power.PAUSED:
                return [], _warning("PowerRequestIgnored", f"{ignored}: the VM is not paused")
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
    conditions = _conditions(
        vm.status.conditions,
        vm.generation,
        ready=(ConditionStatus.FALSE, "Deleting", "the VirtualMachine is being deleted"),
        reconciling=(True, "Deleting", "stopping the domain and removing its volumes"),
        now=now,
    )
    status = vm.status.model_copy(
        update={"printable_status": PrintableStatus.TERMINATING, "conditions": conditions}
    )
    return Decision(tuple(actions), status, finalized=True)


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


def _stalled(vm: VmView, now: datetime, reason: str, message: str) -> Decision:
    conditions = _conditions(
        vm.status.conditions,
        vm.generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=(False, "", ""),
        stalled=(True, reason, message),
        now=now,
    )
    status = vm.status.model_copy(
        update={
            "printable_status": PrintableStatus.FAILED,
            "node_name": vm.node,
            "observed_generation": vm.generation,
            "conditions": conditions,
        }
    )
    return Decision((), status, (_warning(reason, message),))


def failed(
    vm: VmView, reason: str, message: str, *, permanent: bool, now: datetime
) -> VirtualMachineStatus:
    """Status after an action failed: Stalled when retrying cannot help, else Reconciling."""
    conditions = _conditions(
        vm.status.conditions,
        vm.generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=(not permanent, reason, message),
        stalled=(permanent, reason, message),
        now=now,
    )
    return vm.status.model_copy(
        update={
            "printable_status": PrintableStatus.FAILED if permanent else vm.status.printable_status,
            "node_name": vm.node,
            "observed_generation": vm.generation,
            "conditions": conditions,
        }
    )


# --- Status pieces ------------------------------------------------------------------------


def _base_status(vm: VmView, spec: VirtualMachineSpec) -> VirtualMachineStatus:
    interfaces = [
        InterfaceStatus(
            name=nic.name, mac=(nic.mac_address or derive_mac(vm.uid, nic.name)).lower()
        )
        for nic in spec.interfaces
    ]
    return vm.status.model_copy(
        update={
            "observed_generation": vm.generation,
            "printable_status": None,
            "node_name": vm.node,
            "domain_uuid": vm.uid,
            "interfaces": interfaces,
        }
    )


def _printable(observed: Observed, *, starting: bool, backing_off: bool) -> PrintableStatus:
    if backing_off:
        return PrintableStatus.CRASH_LOOP_BACK_OFF
    if starting or not observed.defined:
        return PrintableStatus.STARTING
    return {
        Power.RUNNING: PrintableStatus.RUNNING,
        Power.PAUSED: PrintableStatus.PAUSED,
        Power.STOPPING: PrintableStatus.STOPPING,
        Power.CRASHED: PrintableStatus.FAILED,
    }.get(observed.power, PrintableStatus.STOPPED)


def _ready(
    vm: VmView, observed: Observed, printable: PrintableStatus
) -> tuple[ConditionStatus, str, str]:
    """Ready means "as the run strategy wants it": a VM stopped on purpose is healthy."""
    assert vm.spec is not None
    strategy = vm.spec.run_strategy.value
    match printable:
        case PrintableStatus.RUNNING:
            return ConditionStatus.TRUE, "Running", "the domain is running"
        case PrintableStatus.STOPPED:
            return ConditionStatus.TRUE, "Stopped", f"stopped, as runStrategy {strategy} wants"
        case PrintableStatus.CRASH_LOOP_BACK_OFF:
            return (
                ConditionStatus.FALSE,
                "CrashLoopBackOff",
                "the domain keeps stopping soon after it starts; waiting before the next start",
            )
        case PrintableStatus.PAUSED:
            return ConditionStatus.FALSE, "Paused", "the domain is paused"
        case PrintableStatus.STOPPING:
            return ConditionStatus.FALSE, "Stopping", "the domain is shutting down"
        case PrintableStatus.FAILED:
            return ConditionStatus.FALSE, "Crashed", "the domain crashed"
        case _:
            return ConditionStatus.FALSE, "Starting", "the domain is being started"


def _conditions(
    conditions: list[Condition],
    generation: int,
    *,
    ready: tuple[ConditionStatus, str, str],
    reconciling: tuple[bool, str, str],
    stalled: tuple[bool, str, str] = (False, "Converged", ""),
    now: datetime,
) -> list[Condition]:
    when = rfc3339(now)
    out = set_condition(
        conditions,
        type=ConditionType.READY,
        status=ready[0],
        reason=ready[1],
        message=ready[2],
        observed_generation=generation,
        now=when,
    )
    for kind, (value, reason, message) in (
        (ConditionType.RECONCILING, reconciling),
        (ConditionType.STALLED, stalled),
    ):
        if value:
            out = set_condition(
                out,
                type=kind,
                status=ConditionStatus.TRUE,
                reason=reason,
                message=message,
                observed_generation=generation,
                now=when,
            )
        else:
            # kstatus: abnormal-true conditions are absent when they do not hold.
            out = remove_condition(out, kind)
    return out


def _restart_required(
    conditions: list[Condition], observed: Observed, generation: int, now: datetime
) -> list[Condition]:
    if observed.active and observed.restart_changes:
        return set_condition(
            conditions,
            type=ConditionType.RESTART_REQUIRED,
            status=ConditionStatus.TRUE,
            reason="SpecChanged",
            message=f"{_names(observed.restart_changes)} take effect at the next start; "
            "the running guest keeps its current configuration",
            observed_generation=generation,
            now=rfc3339(now),
        )
    return remove_condition(conditions, ConditionType.RESTART_REQUIRED)


def _paused(
    conditions: list[Condition], observed: Observed, generation: int, now: datetime
) -> list[Condition]:
    if observed.defined and observed.power is Power.PAUSED:
        return set_condition(
            conditions,
            type=ConditionType.PAUSED,
            status=ConditionStatus.TRUE,
            reason="Paused",
            message="the domain is paused",
            observed_generation=generation,
            now=rfc3339(now),
        )
    return remove_condition(conditions, ConditionType.PAUSED)


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


def _describe(actions: list[Action]) -> str:
    return "; ".join(type(a).__name__ for a in actions)


def _warning(reason: str, message: str) -> EventNote:
    return EventNote("Warning", reason, message)


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
