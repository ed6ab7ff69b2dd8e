"""status_patch: the minimal merge patch, proven by applying it (RFC 7386)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from virtfleet.runtime.status import apply_merge_patch, status_patch, strip_nulls

scalars = st.one_of(st.booleans(), st.integers(-5, 5), st.text(max_size=3), st.none())
keys = st.sampled_from(["a", "b", "c", "nodeName", "conditions"])
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=12,
)
statuses = st.dictionaries(keys, values, max_size=5)


def stored(status: dict[str, Any]) -> dict[str, Any]:
    """What the apiserver can hold: no nulls in mappings."""
    result: dict[str, Any] = strip_nulls(status)
    return result


@given(statuses, statuses)
def test_applying_the_patch_gives_the_new_status(old: dict[str, Any], new: dict[str, Any]) -> None:
    old = stored(old)
    patch = status_patch(old, new)
    result = apply_merge_patch(old, patch or {})
    assert result == strip_nulls(new)


@given(statuses)
def test_no_change_means_no_patch(status: dict[str, Any]) -> None:
    status = stored(status)
    assert status_patch(status, status) is None


@given(statuses, statuses)
def test_the_patch_names_only_changed_top_level_keys(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    old, new = stored(old), stored(new)
    patch = status_patch(old, new) or {}
    for key in patch:
        # Compared as JSON: `true` and `1` are different values to the apiserver, while
        # Python's == calls them equal (hypothesis found `nodeName: True -> 1`).
        assert as_json(old.get(key)) != as_json(new.get(key))


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def test_a_change_of_json_type_is_a_change() -> None:
    assert status_patch({"nodeName": True}, {"nodeName": 1}) == {"nodeName": 1}
    assert status_patch({"deep": {"x": 1.0}}, {"deep": {"x": 1}}) == {"deep": {"x": 1}}


def test_examples() -> None:
    old = {
        "printableStatus": "Running",
        "nodeName": "node-a",
        "interfaces": [{"name": "a", "mac": "x"}],
        "deep": {"x": 1, "y": {"z": 2}},
    }
    new = {
        "printableStatus": "Unknown",
        "interfaces": [{"name": "a", "mac": "x", "ip": "10.0.0.2"}],
        "deep": {"x": 1, "y": {"z": 3}},
    }
    assert status_patch(old, new) == {
        "printableStatus": "Unknown",
        "nodeName": None,
        "interfaces": [{"name": "a", "mac": "x", "ip": "10.0.0.2"}],
        "deep": {"y": {"z": 3}},
    }


def test_none_in_new_means_absent() -> None:
    assert status_patch({"a": 1}, {"a": None}) == {"a": None}
    assert status_patch({}, {"a": None}) is None
    assert status_patch(None, {}) is None
    assert status_patch(None, {"a": {"b": None, "c": 1}}) == {"a": {"c": 1}}


def test_type_changes_replace_whole() -> None:
    assert status_patch({"a": 1}, {"a": True}) == {"a": True}
    assert status_patch({"a": {"b": 1}}, {"a": [1]}) == {"a": [1]}
    assert status_patch({"a": [1]}, {"a": {"b": 1}}) == {"a": {"b": 1}}
