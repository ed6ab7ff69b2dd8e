"""kopf settings shared by both processes, with per-identity persistence (DESIGN §6).

Every process that runs kopf handlers on VirtualMachines (one agent per node, the
controller) needs its *own* finalizer name and its *own* annotation prefixes:

* kopf removes its finalizer from any object its filters do not match ("Removing the
  finalizer, as there are no handlers requiring it"), so a shared name would let node B
  strip node A's finalizer;
* progress and diff-base annotations under one prefix would be read and overwritten by
  every agent. With distinct prefixes, kopf marks each prefix ``<prefix>/kopf-managed``
  and the other operators ignore it when computing diffs (no ping-pong).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any, cast

import kopf

from virtfleet import logs
from virtfleet.identity import API_GROUP

#: Longest annotation prefix kopf accepts without warning (253 - 63 - 1).
MAX_PREFIX = 189
_IDENTITY = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def storage_prefix(identity: str) -> str:
    """The annotation prefix of one process, e.g. ``agent-node-a.virtfleet.io``.

    Long node names are shortened with a hash so the prefix stays a valid DNS subdomain
    that kopf can use for its keys.
    """
    if not _IDENTITY.match(identity):
        raise ValueError(
            f"identity {identity!r} must be lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    prefix = f"{identity}.{API_GROUP}"
    if len(prefix) <= MAX_PREFIX:
        return prefix
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    keep = MAX_PREFIX - len(API_GROUP) - len(digest) - 2
    return f"{identity[:keep].rstrip('-.')}-{digest}.{API_GROUP}"


def default_finalizer(identity: str) -> str:
    return f"{API_GROUP}/{identity}"[:253]


class EmptyEssence(kopf.DiffBaseStorage):
    """Every body's essence is empty: nothing kopf could diff, at no cost.

    kopf's own essence is a deep copy of the whole body, copied again to clear its
    progress annotations, for every event. For processes that never diff (below, and the
    agent's ``NoDiffBase``) those copies were a few per cent of their CPU at fleet scale.
    """

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[Any] | None = None,
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})


class WatchOnlyDiffBase(EmptyEssence, kopf.AnnotationsDiffBaseStorage):
    """The diff base of a process whose handlers only watch (``on.event``): none.

    kopf computes every event's diff base — a deep copy of the whole body, copied again
    to clear its progress annotations — before it looks whether any change handler
    wants it, then drops it when none does: ~6 % of the controller's CPU at a fleet's
    event rate. Valid only while the process registers no change (create/update/
    delete/resume) and no daemon or timer handlers; a unit test keeps that true.
    """

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None


def configure_kopf(
    settings: kopf.OperatorSettings,
    *,
    identity: str,
    finalizer: str | None,
    posting_level: int = logging.WARNING,
    log_format: logs.LogFormat = "auto",
    log_level: str = "INFO",
    watch_only: bool = False,
) -> None:
    """Configure ``settings`` (from an ``on.startup`` handler) for one process.

    ``identity`` names the process (``controller``, ``agent-<node>``); ``finalizer`` is
    the finalizer its handlers may add. ``None`` means the process should never hold
    objects: it still gets a name of its own, so kopf can only ever remove *that* one.

    kopf posts Kubernetes Events for handler log lines at or above ``posting_level``;
    WARNING keeps routine "Handler succeeded" lines out of the API-writes budget.
    The watch inactivity timeout is left at kopf's default on purpose (bookmarks
    keep a healthy stream alive; a deaf stream is reconnected). ``watch_only``: the
    process has ``on.event`` handlers only (:class:`WatchOnlyDiffBase`).
    """
    logs.configure(log_format, log_level)
    prefix = storage_prefix(identity)
    settings.persistence.finalizer = finalizer or default_finalizer(identity)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix, v1=False)
    diffbase = WatchOnlyDiffBase if watch_only else kopf.AnnotationsDiffBaseStorage
    settings.persistence.diffbase_storage = diffbase(
        prefix=prefix, key="last-handled-configuration", v1=False
    )
    settings.posting.level = posting_level
    settings.posting.reporting_component = f"virtfleet-{identity}"[:128]
    settings.posting.event_name_prefix = "virtfleet-"
