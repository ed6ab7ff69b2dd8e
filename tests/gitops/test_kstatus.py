"""VM statuses from ``virtfleet.reconcile.vm.decide`` obey kstatus (sigs.k8s.io/cli-utils).

kstatus is what Flux's health checks, ``kubectl wait`` and Argo CD's generic logic read:

* ``status.observedGeneration`` equals ``metadata.generation`` once the controller looked;
* ``Reconciling`` and ``Stalled`` are "abnormal-true" conditions: present with
  ``status: True`` while they hold, and *absent* (not False) otherwise;
* ``Ready`` is present on every status the agent writes, and never True together with
  ``Reconciling`` or ``Stalled`` True; ``Reconciling`` and ``Stalled`` are never both True;
* every condition carries the generation it was computed for.

The scenarios walk the decision function through the states a VM goes through.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from virtfleet.api.virtualmachine import VirtualMachineSpec, VirtualMachineStatus
from virtfleet.reconcile.vm import Observed, Power, StopCause, VmView, decide, failed

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
UID = "8c954d72-e2b0-50c1-9ac5-db3a5403563f"
ABNORMAL_TRUE = ("Reconciling", "Stalled")


def view(
    *, strategy: str = "Always", generation: int = 1, status: dict[str, Any] | None = None
) -> VmView:
    return VmView(
        namespace="ns",
        name="vm",
        uid=UID,
        generation=generation,
        node="node-a",
        spec=VirtualMachineSpec.model_validate(
            {"memory": {"size": "64Mi"}, "runStrategy": strategy}
        ),
        status=VirtualMachineStatus.model_validate(status or {}),
    )


def wire(status: VirtualMachineStatus) -> dict[str, Any]:
    out: dict[str, Any] = status.to_wire()
    return out


def check_kstatus(status: dict[str, Any], generation: int) -> None:
    assert status.get("observedGeneration") == generation
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    assert "Ready" in conditions, "Ready is always reported"
    for kind in ABNORMAL_TRUE:
        if kind in conditions:
            assert conditions[kind]["status"] == "True", f"{kind} must be absent, not False"
            assert conditions[kind]["reason"], f"{kind} needs a reason"
    reconciling = "Reconciling" in conditions
    stalled = "Stalled" in conditions
    assert not (reconciling and stalled), "Reconciling and Stalled are exclusive"
    if reconciling or stalled:
        assert conditions["Ready"]["status"] != "True"
    for cond in conditions.values():
        assert cond["observedGeneration"] == generation, cond["type"]
        assert cond["lastTransitionTime"].endswith("Z")


def started(seconds_ago: float = 600) -> dict[str, Any]:
    return {
        "lastStartTime": (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "domainUUID": UID,
    }


def converge(vm: VmView, observed: Observed) -> VmView:
    """One pass, its status written back (what the agent does between passes)."""
    decision = decide(vm, observed, NOW)
    return VmView(**{**vm.__dict__, "status": decision.status})


RUNNING = Observed(defined=True, power=Power.RUNNING)
SCENARIOS: dict[str, Callable[[], tuple[VirtualMachineStatus, int]]] = {
    "new VM, nothing defined yet": lambda: (
        decide(view(), Observed(defined=False), NOW).status,
        1,
    ),
    "defined, starting": lambda: (
        decide(view(), Observed(defined=True, power=Power.STOPPED), NOW).status,
        1,
    ),
    "running and converged": lambda: (
        decide(view(status=started()), RUNNING, NOW).status,
        1,
    ),
    "halted on purpose": lambda: (
        decide(view(strategy="Halted"), Observed(defined=True, power=Power.STOPPED), NOW).status,
        1,
    ),
    "spec changed (generation 3)": lambda: (
        decide(view(generation=3, status=started()), RUNNING, NOW).status,
        3,
    ),
    "crash loop": lambda: (
        decide(
            view(status={**started(3), "consecutiveFailures": 4}),
            Observed(defined=True, power=Power.STOPPED, stop_cause=StopCause.CRASHED),
            NOW,
        ).status,
        1,
    ),
    "permanent failure (Stalled)": lambda: (
        failed(view(), "DefineFailed", "image 'x' not found", permanent=True, now=NOW),
        1,
    ),
    "transient failure (Reconciling)": lambda: (
        failed(view(), "LibvirtDown", "connection refused", permanent=False, now=NOW),
        1,
    ),
    "invalid spec": lambda: (
        decide(
            VmView(**{**view().__dict__, "spec": None, "invalid": "spec.x: bad"}), RUNNING, NOW
        ).status,
        1,
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_status_obeys_kstatus(scenario: str) -> None:
    status, generation = SCENARIOS[scenario]()
    check_kstatus(wire(status), generation)


def test_converged_vm_has_no_abnormal_conditions_and_is_ready() -> None:
    vm = converge(view(status=started()), RUNNING)
    conditions = {c["type"]: c for c in wire(vm.status)["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert not set(ABNORMAL_TRUE) & set(conditions)


def test_reconciling_disappears_once_converged() -> None:
    """Stalled/Reconciling from a failure are removed (not set False) when it converges."""
    vm = view()
    vm = VmView(
        **{
            **vm.__dict__,
            "status": failed(vm, "LibvirtDown", "refused", permanent=False, now=NOW).model_copy(
                update=VirtualMachineStatus.model_validate(started()).model_dump(
                    include={"last_start_time", "domain_uuid"}
                )
            ),
        }
    )
    assert "Reconciling" in {c.type for c in vm.status.conditions}
    after = converge(vm, RUNNING)
    status = wire(after.status)
    check_kstatus(status, 1)
    assert not set(ABNORMAL_TRUE) & {c["type"] for c in status["conditions"]}


def test_stalled_then_new_generation_clears_it() -> None:
    vm = view()
    stalled = failed(vm, "DefineFailed", "image 'x' not found", permanent=True, now=NOW)
    fixed = VmView(**{**vm.__dict__, "generation": 2, "status": stalled})
    status = wire(decide(fixed, Observed(defined=False), NOW).status)
    check_kstatus(status, 2)
    assert "Stalled" not in {c["type"] for c in status["conditions"]}
