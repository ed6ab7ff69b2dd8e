"""Every CEL rule of the models has an invalid example that the real apiserver refuses.

``e2e/test_crds.py`` applies each ``examples/invalid/*.yaml`` to the apiserver and checks
that a refusal carries every ``# expect:`` message that is a CEL message. This test makes
that proof complete: a rule without an example (a new rule, a renamed message) fails here,
so no rule reaches the CRDs without being exercised against the apiserver once. Schema
refusals (enums, patterns, minimums) get at least one example per user-written kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from virtfleet.api.base import CelRule
from virtfleet.api.resources import KINDS

REPO = Path(__file__).resolve().parents[2]
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))
E2E_CRDS = REPO / "e2e" / "test_crds.py"
#: Written by the agents only (no user manifest to refuse).
AGENT_KINDS = {"VMHost"}


@dataclass(frozen=True)
class Located:
    kind: str
    model: str
    rule: CelRule


def _types(annotation: object) -> list[type]:
    args = getattr(annotation, "__args__", ())
    out = [a for a in args for a in ([a] if isinstance(a, type) else _types(a))]
    return [annotation, *out] if isinstance(annotation, type) else out


def _visit(model: type, kind: str, seen: set[type], found: list[Located]) -> None:
    if model in seen or not hasattr(model, "model_fields"):
        return
    seen.add(model)
    for rule in model.__dict__.get("cel_rules", ()):
        found.append(Located(kind, model.__name__, rule))
    for info in model.model_fields.values():
        for arg in _types(info.annotation):
            _visit(arg, kind, seen, found)


def all_rules() -> list[Located]:
    """Every CelRule reachable from each kind's spec model, plus the kinds' root rules."""
    found: list[Located] = []
    for kind in KINDS:
        _visit(kind.spec_model, kind.kind, set(), found)
        found.extend(Located(kind.kind, "metadata", rule) for rule in kind.root_rules)
    return found


def expectations() -> dict[str, list[str]]:
    """``{kind: [expected message, ...]}`` over all invalid examples."""
    out: dict[str, list[str]] = {}
    for path in INVALID:
        text = path.read_text()
        kind = next(d for d in yaml.safe_load_all(text) if d).get("kind", "")
        messages = re.findall(r"^# expect: (?:[^:]*: )?(.*)$", text, flags=re.M)
        out.setdefault(str(kind), []).extend(messages)
    return out


RULES = all_rules()


def test_rules_are_found() -> None:
    """The walk reaches nested models (a broken walk would make the coverage test vacuous)."""
    models = {located.model for located in RULES}
    assert {"VirtualMachineSpec", "Disk", "DiskSource", "Interface", "IoTune"} <= models
    assert len(RULES) >= 20


@pytest.mark.parametrize(
    "located",
    [r for r in RULES if not r.rule.transition],
    ids=lambda r: f"{r.kind}.{r.model}:{r.rule.message[:40]}",
)
def test_every_rule_has_an_invalid_example(located: Located) -> None:
    messages = expectations().get(located.kind, [])
    assert located.rule.message in messages, (
        f"no examples/invalid/*.yaml of kind {located.kind} expects "
        f"{located.rule.message!r} ({located.model}); add one so e2e/test_crds.py proves it"
    )


#: Transition rules whose update test e2e/test_crds.py does not have yet. Strict xfail:
#: the day the test lands, the entry must go.
AWAITING_E2E_UPDATE: set[str] = set()


@pytest.mark.parametrize(
    "located",
    [
        pytest.param(
            r,
            marks=pytest.mark.xfail(
                r.kind in AWAITING_E2E_UPDATE,
                reason="e2e/test_crds.py: an update that changes spec.vni / spec.subnet",
                strict=True,
            ),
        )
        for r in RULES
        if r.rule.transition
    ],
    ids=lambda r: f"{r.kind}.{r.model}:{r.rule.message[:30]}",
)
def test_transition_rules_are_exercised_by_an_update(located: Located) -> None:
    """A transition rule needs an update, not an apply: e2e/test_crds.py does one."""
    assert located.rule.message in E2E_CRDS.read_text()


def test_schema_refusals_have_an_example_per_kind() -> None:
    """Enum, pattern and range refusals: at least one example per user-written kind."""
    cel = {r.rule.message for r in RULES}
    by_kind = expectations()
    for kind in KINDS:
        if kind.kind in AGENT_KINDS:
            continue
        schema = [m for m in by_kind.get(kind.kind, []) if m not in cel]
        assert schema, f"no schema-level invalid example for {kind.kind}"
        joined = "\n".join(schema)
        assert re.search(r"Input should be|must be a DNS label|is not a duration", joined), joined
