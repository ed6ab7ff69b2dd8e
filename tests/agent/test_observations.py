"""The observation memo gives what computing again would give, and recomputes on change."""

from __future__ import annotations

from virtfleet.agent.observations import ObservationMemo
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain import DomainInputs, build_domain, diff, observe, render_xml
from virtfleet.domain.examples import example_inputs
from virtfleet.domain.observe import observe_config

UID = "11111111-2222-4333-8444-555555555555"


def inputs(memory: str = "64Mi") -> DomainInputs:
    spec = VirtualMachineSpec.model_validate({"memory": {"size": memory}})
    return example_inputs(spec, namespace="ns", name="web", uid=UID)


def xml_of(source: DomainInputs) -> str:
    return render_xml(source)


def test_unchanged_xml_and_inputs_reuse_the_comparison() -> None:
    memo = ObservationMemo()
    wanted = inputs()
    first = memo.inactive(UID, wanted, xml_of(wanted))
    assert not first.drift
    assert memo.inactive(UID, inputs(), xml_of(wanted)) is first
    assert memo.rendered(UID, inputs())
    assert len(memo) == 1


def test_a_changed_domain_is_compared_again() -> None:
    memo = ObservationMemo()
    wanted = inputs()
    memo.inactive(UID, wanted, xml_of(wanted))
    edited = xml_of(inputs("128Mi"))  # changed behind the agent's back
    seen = memo.inactive(UID, wanted, edited)
    assert seen.drift.paths == diff(observe_config(build_domain(wanted)), observe(edited)).paths
    assert seen.drift


def test_changed_inputs_are_rendered_and_compared_again() -> None:
    memo = ObservationMemo()
    old = inputs()
    memo.inactive(UID, old, xml_of(old))
    new = inputs("128Mi")
    assert not memo.rendered(UID, new)
    seen = memo.inactive(UID, new, xml_of(old))
    assert seen.drift
    assert memo.rendered(UID, new)


def test_the_running_comparison_follows_its_desired_domain_and_xml() -> None:
    memo = ObservationMemo()
    wanted = inputs()
    seen = memo.inactive(UID, wanted, xml_of(wanted))
    first = memo.running(UID, seen.desired, xml_of(wanted))
    assert not first
    assert memo.running(UID, seen.desired, xml_of(wanted)) is first
    assert memo.running(UID, seen.desired, xml_of(inputs("128Mi")))
    other = memo.inactive(UID, inputs("128Mi"), xml_of(wanted))
    assert memo.running(UID, other.desired, xml_of(wanted))


def test_forgetting_drops_both_comparisons() -> None:
    memo = ObservationMemo()
    wanted = inputs()
    seen = memo.inactive(UID, wanted, xml_of(wanted))
    memo.running(UID, seen.desired, xml_of(wanted))
    memo.forget(UID)
    assert len(memo) == 0
    assert not memo.rendered(UID, wanted)
