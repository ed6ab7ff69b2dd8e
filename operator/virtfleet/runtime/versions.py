"""Which of two copies of an object is newer, so that no cache ever rolls back.

A write's response and the watch events of other writers come on different connections:
the response to our write can arrive after the event of someone else's later write.
Storing it then puts the older copy back, and a loop that diffs its wanted status
against that copy finds nothing to write while the apiserver holds the other writer's
value (CI: an agent never overwrote the controller's ``Unknown`` after a stall).

resourceVersions are opaque by contract, but etcd-backed apiservers hand out increasing
integers, and Kubernetes now says so for one resource's versions (KEP-5504,
``CompareResourceVersion``). Anything non-numeric counts as newer (never dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

K = TypeVar("K")


def resource_version(body: Mapping[str, Any]) -> int | None:
    raw = str((body.get("metadata") or {}).get("resourceVersion") or "")
    return int(raw) if raw.isascii() and raw.isdigit() else None


def is_older(body: Mapping[str, Any], than: Mapping[str, Any] | None) -> bool:
    """True when ``body`` is known to be an older copy than ``than``."""
    if than is None:
        return False
    mine, theirs = resource_version(body), resource_version(than)
    return mine is not None and theirs is not None and mine < theirs


def older_version(candidate: str, current: str) -> bool:
    """:func:`is_older` for two resourceVersions."""
    return is_older({"metadata": {"resourceVersion": candidate}},
                    {"metadata": {"resourceVersion": current}})  # fmt: skip


def store_newest(
    cache: MutableMapping[K, dict[str, Any]],
    key: K,
    body: Mapping[str, Any],
    *,
    shape: Callable[[Mapping[str, Any]], dict[str, Any]] = dict,
    cached_only: bool = False,
) -> bool:
    """Put ``shape(body)`` under ``key`` unless the cache holds a newer copy.

    ``cached_only``: only replace an entry that is there (a write's response must not
    bring back an object whose deletion or departure the cache already saw).
    """
    current = cache.get(key)
    if current is None and cached_only:
        return False
    if is_older(body, current):
        return False
    cache[key] = shape(body)
    return True
