"""Telling an object that its reconcile failed unexpectedly: a condition and an Event.

The work queues call :func:`report_internal_error` through their ``on_error`` hook
(:class:`virtfleet.runtime.queue.WorkQueue`) before they retry the key with backoff, so
an error no loop anticipated is visible in ``kubectl describe`` and in kstatus-aware
tools instead of only in a traceback in the process's log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from virtfleet.logs import get_logger
from virtfleet.reconcile.internal import (
    INTERNAL_ERROR,
    internal_error_message,
    internal_error_status,
)
from virtfleet.runtime.kubeapi import Conflict, KubeApi, KubeError, NotFound
from virtfleet.runtime.status import status_patch
from virtfleet.runtime.versions import store_newest

_log = get_logger("virtfleet.runtime.failures")

K = TypeVar("K", bound=Hashable)


def _generation(body: Mapping[str, Any]) -> int:
    raw = (body.get("metadata") or {}).get("generation")
    return raw if isinstance(raw, int) and raw >= 0 else 1


async def report_internal_error(
    kube: KubeApi,
    kind: str,
    body: Mapping[str, Any],
    exc: Exception,
    component: str,
    *,
    cas: bool,
) -> dict[str, Any] | None:
    """``Stalled``/``Ready=False`` (``InternalError``) on ``body`` and a Warning Event.

    Returns the object as written (for the caller's cache), or None when nothing was
    written: unchanged (the same error again), gone, or (``cas``: the write carries the
    cached resourceVersion, for writers that share the status) changed meanwhile — the
    queue's retry then reports on the newer object. Never raises a KubeError.
    """
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace"), str(meta.get("name") or "")
    message = internal_error_message(exc)
    wanted = internal_error_status(
        body.get("status"), _generation(body), message, datetime.now(UTC)
    )
    updated: dict[str, Any] | None = None
    patch = status_patch(body.get("status"), wanted)
    if patch is not None:
        version = str(meta.get("resourceVersion")) if cas and meta.get("resourceVersion") else None
        try:
            updated = await kube.patch_status(
                kind, namespace, name, patch, resource_version=version
            )
        except (Conflict, NotFound) as error:
            _log.info("internal error not written", kind=kind, name=name, why=str(error))
        except KubeError as error:
            _log.warning(
                "could not write the internal error", kind=kind, name=name, error=str(error)
            )
    await kube.record_event(body, "Warning", INTERNAL_ERROR, message, component)
    return updated


def error_reporter(
    kube: KubeApi,
    kind: str | Callable[[K], str],
    component: str,
    *,
    lookup: Callable[[K], Iterable[Mapping[str, Any]]],
    store: Callable[[K, dict[str, Any]], object],
    cas: bool,
) -> Callable[[K, Exception], Awaitable[None]]:
    """A work queue's ``on_error`` hook: report on the objects ``lookup(key)`` names.

    ``kind`` may be read from the key (a queue of several kinds). ``store(key, body)``
    puts each written object back into the loop's cache, so the loop's next status
    write is computed against what is stored (and clears the condition).
    """

    async def hook(key: K, exc: Exception) -> None:
        what = kind if isinstance(kind, str) else kind(key)
        for body in list(lookup(key)):
            updated = await report_internal_error(kube, what, body, exc, component, cas=cas)
            if updated is not None:
                store(key, updated)

    return hook


def cache_reporter(
    kube: KubeApi,
    kind: str | Callable[[K], str],
    component: str,
    cache: MutableMapping[K, dict[str, Any]],
    *,
    cas: bool,
) -> Callable[[K, Exception], Awaitable[None]]:
    """:func:`error_reporter` for a loop whose queue keys are the keys of its cache."""

    def keep(key: K, body: dict[str, Any]) -> None:
        store_newest(cache, key, body, cached_only=True)

    return error_reporter(
        kube,
        kind,
        component,
        lookup=lambda key: [cache[key]] if key in cache else [],
        store=keep,
        cas=cas,
    )
