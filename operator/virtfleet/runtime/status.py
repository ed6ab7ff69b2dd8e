"""Minimal JSON merge patches (RFC 7386) between a stored status and the wanted one.

DESIGN §3.4: status is written only when it changes. Computing the smallest merge patch
both answers "did it change?" (``None``) and keeps each write small, so two writers that
own different status fields (agent and controller) do not clobber each other's fields.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def strip_nulls(value: Any) -> Any:
    """``value`` with ``None`` removed from every mapping (lists are kept as they are).

    A merge patch cannot store a null (null means "delete"), so ``None`` in a wanted
    status means "absent"; normalising first keeps the comparison honest.
    """
    if isinstance(value, Mapping):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    return copy.deepcopy(value)


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The minimal merge patch turning ``old`` into ``new``; ``None`` when nothing changed.

    Keys missing from ``new`` (or ``None`` there) become ``null`` (deleted); nested
    mappings are diffed recursively; lists and scalars are replaced whole, because a
    merge patch cannot address list items.
    """
    patch = _diff(old or {}, strip_nulls(new))
    return patch or None


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, wanted in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(wanted)
            continue
        stored = old[key]
        if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
            nested = _diff(stored, wanted)
            if nested:
                patch[key] = nested
        elif stored != wanted or type(stored) is not type(wanted):
            patch[key] = copy.deepcopy(wanted)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 ``MergePatch(target, patch)``, returning a new value.

    Used to update local caches with what was just written, and by tests to prove
    that :func:`status_patch` is exact.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result
