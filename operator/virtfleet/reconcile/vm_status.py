"""The VirtualMachine status a decision reports: printable status and conditions.

:func:`virtfleet.reconcile.vm.decide` settles what to do; this module says how that looks
from outside: ``printableStatus``, the kstatus conditions (Ready, Reconciling, Stalled,
through :func:`virtfleet.api.conditions.kstatus_conditions`) and virtfleet's own
RestartRequired and Paused.
"""

from __future__ import annotations

from datetime import datetime

from virtfleet.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    kstatus_conditions,
    remove_condition,
    rfc3339,
    set_condition,
)
from virtfleet.api.virtualmachine import (
    InterfaceStatus,
    PrintableStatus,
    VirtualMachineSpec,
    VirtualMachineStatus,
)
from virtfleet.reconcile.vm_guest import (
    agent_condition,
    guest_os_info,
    with_guest_addresses,
    without_guest,
)
from virtfleet.reconcile.vm_model import (
    Action,
    Decision,
    EventNote,
    Observed,
    Power,
    Start,
    VmView,
    warning,
)


def base_status(vm: VmView, spec: VirtualMachineSpec) -> VirtualMachineStatus:
    """What every pass over a valid spec reports, before power and conditions."""
    before = {nic.name: nic for nic in vm.status.interfaces}
    interfaces = [
        with_guest_addresses(
            InterfaceStatus(
                name=nic.name,
                mac=nic.mac_for(vm.uid),
                ip=vm.addresses.get(nic.name),
                network=nic.network,
            ),
            vm.guest,
            before.get(nic.name),
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
            "guest_os_info": guest_os_info(vm.guest, vm.status.guest_os_info),
            "high_availability": spec.high_availability,
            "console_endpoint": vm.console,
        }
    )


def report(
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
    reconciling: tuple[str, str] | None = None
    if actions or (requeue is not None and not backing_off):
        reconciling = ("Converging", _describe(actions) or "waiting for the domain")
    conditions = kstatus_conditions(
        status.conditions,
        vm.generation,
        ready=ready,
        reconciling=reconciling,
        stalled=None,
        now=rfc3339(now),
    )
    conditions = _restart_required(conditions, observed, vm.generation, now)
    conditions = _paused(conditions, observed, vm.generation, now)
    running = observed.defined and observed.power is Power.RUNNING
    conditions = agent_condition(
        conditions, running=running, report=vm.guest, generation=vm.generation, now=now
    )
    update: dict[str, object] = {"printable_status": printable, "conditions": conditions}
    if not running:  # what the agent said is about a guest that no longer runs
        update["guest_os_info"] = None
        update["interfaces"] = [without_guest(nic) for nic in status.interfaces]
    status = status.model_copy(update=update)
    return Decision(tuple(actions), status, tuple(events), requeue)


def terminating_status(vm: VmView, now: datetime) -> VirtualMachineStatus:
    """While the VirtualMachine is being deleted: its domain and volumes are going."""
    conditions = kstatus_conditions(
        vm.status.conditions,
        vm.generation,
        ready=(ConditionStatus.FALSE, "Deleting", "the VirtualMachine is being deleted"),
        reconciling=("Deleting", "stopping the domain and removing its volumes"),
        stalled=None,
        now=rfc3339(now),
    )
    return vm.status.model_copy(
        update={"printable_status": PrintableStatus.TERMINATING, "conditions": conditions}
    )


def stalled(vm: VmView, now: datetime, reason: str, message: str) -> Decision:
    """Nothing to do until the spec changes: Stalled, Failed, and a Warning saying why."""
    conditions = kstatus_conditions(
        vm.status.conditions,
        vm.generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=None,
        stalled=(reason, message),
        now=rfc3339(now),
    )
    status = vm.status.model_copy(
        update={
            "printable_status": PrintableStatus.FAILED,
            "node_name": vm.node,
            "observed_generation": vm.generation,
            "conditions": conditions,
        }
    )
    return Decision((), status, (warning(reason, message),))


def failed(
    vm: VmView, reason: str, message: str, *, permanent: bool, now: datetime
) -> VirtualMachineStatus:
    """Status after an action failed: Stalled when retrying cannot help, else Reconciling."""
    conditions = kstatus_conditions(
        vm.status.conditions,
        vm.generation,
        ready=(ConditionStatus.FALSE, reason, message),
        reconciling=None if permanent else (reason, message),
        stalled=(reason, message) if permanent else None,
        now=rfc3339(now),
    )
    return vm.status.model_copy(
        update={
            "printable_status": PrintableStatus.FAILED if permanent else vm.status.printable_status,
            "node_name": vm.node,
            "observed_generation": vm.generation,
            "conditions": conditions,
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


def _restart_required(
    conditions: list[Condition], observed: Observed, generation: int, now: datetime
) -> list[Condition]:
    if observed.active and observed.restart_changes:
        return set_condition(
            conditions,
            type=ConditionType.RESTART_REQUIRED,
            status=ConditionStatus.TRUE,
            reason="SpecChanged",
            message=f"{', '.join(observed.restart_changes)} take effect at the next start; "
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


def _describe(actions: list[Action]) -> str:
    return "; ".join(type(a).__name__ for a in actions)
