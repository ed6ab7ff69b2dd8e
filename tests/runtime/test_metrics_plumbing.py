"""What the metrics hooks report: bounded labels for libvirt calls and apiserver paths."""

from __future__ import annotations

import functools

import pytest

from virtfleet.hypervisor.executor import Executors, operation_name
from virtfleet.runtime.kube import resource_of


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/apis/virtfleet.io/v1alpha1/namespaces/ns/virtualmachines/web/status",
         "virtualmachines/status"),
        ("/apis/virtfleet.io/v1alpha1/namespaces/ns/virtualmachines", "virtualmachines"),
        ("/apis/virtfleet.io/v1alpha1/vmhosts/node-a/status", "vmhosts/status"),
        ("/api/v1/namespaces/ns/events", "events"),
        ("/api/v1/namespaces/ns", "namespaces"),
        ("/apis/authentication.k8s.io/v1/tokenreviews", "tokenreviews"),
        ("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/l?x=1", "leases"),
    ],
)  # fmt: skip
def test_a_path_is_labelled_by_its_resource_only(path: str, resource: str) -> None:
    assert resource_of(path) == resource


def outer() -> object:
    def call() -> int:
        return 1

    return call


def test_operations_are_named_by_their_place_in_the_code() -> None:
    assert operation_name(outer()) == "outer.call"  # type: ignore[arg-type]
    assert operation_name(functools.partial(len, "x")) == "len"
    assert operation_name(resource_of) == "kube.resource_of"


async def test_every_call_is_observed_with_its_pool() -> None:
    executors = Executors(1, 1)
    seen: list[tuple[str, str]] = []
    executors.observer = lambda pool, operation, seconds: seen.append((pool, operation))
    try:
        assert await executors.run(len, "abc") == 3
        await executors.run_long(sorted, [2, 1])
        with pytest.raises(ZeroDivisionError):
            await executors.run(divmod, 1, 0)
    finally:
        executors.shutdown()
    assert seen == [("short", "len"), ("long", "sorted"), ("short", "divmod")]
