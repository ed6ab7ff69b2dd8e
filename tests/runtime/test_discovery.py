"""KubeClient.wait_until_served: the startup gate that keeps kopf from missing our APIs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kopf

from virtfleet.api.resources import KINDS
from virtfleet.identity import API_GROUP, API_VERSION
from virtfleet.runtime.kube import ApiUnavailable, KubeClient

ALL = [{"name": kind.plural} for kind in KINDS]


def scripted(kube: KubeClient, answers: Iterator[Any], asked: list[str]) -> None:
    async def request(method: str, path: str, **_: Any) -> Any:
        asked.append(path)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    kube.request = request  # type: ignore[method-assign]


async def test_waits_through_an_absent_apiserver_and_an_unlisted_group() -> None:
    kube = KubeClient(kopf.ConnectionInfo(server="https://127.0.0.1:1"))
    asked: list[str] = []
    group = {"groups": [{"name": API_GROUP}]}
    answers = iter(
        [
            ApiUnavailable("connection refused"),  # apiserver down
            {"groups": [{"name": "apps"}]},  # up, CRD discovery not ready
            group,
            {"resources": ALL[:2]},  # group listed, not every kind yet
            group,
            {"resources": ALL},
        ]
    )
    scripted(kube, answers, asked)
    await kube.wait_until_served(interval=0)
    version = f"/apis/{API_GROUP}/{API_VERSION}"
    assert asked == ["/apis", "/apis", "/apis", version, "/apis", version]
    await kube.close()
