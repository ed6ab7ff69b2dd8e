"""Waiting for the apiserver to serve virtfleet's APIs before kopf starts watching."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from virtfleet.api.resources import KINDS
from virtfleet.identity import API_GROUP, API_VERSION
from virtfleet.logs import get_logger
from virtfleet.runtime.kubeapi import KubeError

_log = get_logger("virtfleet.runtime.kube")

#: ``KubeClient.request``: one REST call returning decoded JSON.
Request = Callable[..., Awaitable[Any]]


async def wait_until_served(
    request: Request, *, interval: float = 1.0, log_every: float = 10.0
) -> None:
    """Return once API discovery lists every virtfleet kind (``/apis`` and the version).

    kopf reads discovery once when it starts watching and afterwards only when a CRD
    changes: an operator started while the apiserver is (re)starting, before it serves
    the CRDs' APIs again, would never watch them. Call from a startup handler (kopf
    starts watching after those).
    """
    wanted = {kind.plural for kind in KINDS}
    loop = asyncio.get_running_loop()
    waited_since = loop.time()
    logged = waited_since
    while True:
        try:
            groups = await request("GET", "/apis", what="API discovery")
            listed = any(g.get("name") == API_GROUP for g in groups.get("groups") or [])
            served: set[str] = set()
            if listed:
                resources = await request(
                    "GET", f"/apis/{API_GROUP}/{API_VERSION}", what="API discovery"
                )
                served = {str(r.get("name")) for r in resources.get("resources") or []}
            missing = wanted - served
        except KubeError as exc:
            missing, listed = wanted, False
            reason = str(exc)
        else:
            reason = "not served yet"
        if not missing:
            return
        if loop.time() - logged >= log_every:
            logged = loop.time()
            _log.warning(
                "waiting for the apiserver to serve virtfleet's APIs",
                missing=sorted(missing),
                reason=reason,
                waited_s=round(logged - waited_since),
            )
        await asyncio.sleep(interval)
