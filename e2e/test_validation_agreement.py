"""Offline ``virtfleet validate`` and the real apiserver agree on every manifest.

A GitOps repository's CI runs ``virtfleet validate``; if it accepts what the apiserver
refuses (or the other way round) the sync fails after the merge. Every shipped invalid
example and a generated corpus of hostile values (trailing newlines, padding, XML
non-characters, huge exponents, overflowing durations, integers where strings belong) go
through both, one object at a time, and each verdict must be the same.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.testing import Cluster
from virtfleet import manifests

REPO = Path(__file__).resolve().parents[1]
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))

_VM: dict[str, Any] = {
    "apiVersion": "virtfleet.io/v1alpha1",
    "kind": "VirtualMachine",
    "metadata": {"name": "agree"},
    "spec": {
        "memory": {"size": "128Mi"},
        "disks": [{"name": "data", "size": "1Gi", "source": {"blank": {}}}],
        "kernel": {"image": "vmlinuz", "cmdline": "console=ttyS0"},
        "interfaces": [{"name": "nic0"}],
    },
}
_SNAPSHOT: dict[str, Any] = {
    "apiVersion": "virtfleet.io/v1alpha1",
    "kind": "VMSnapshot",
    "metadata": {"name": "agree"},
    "spec": {"vmName": "demo", "failureDeadline": "5m"},
}


def _set(body: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    out = copy.deepcopy(body)
    target: Any = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


_HTTP_VM = _set(
    _VM,
    ("spec", "disks", 0),
    {
        "name": "root",
        "source": {"http": {"url": "http://images.example/a.qcow2", "sha256": "0" * 64}},
    },
)
_URLS = [
    "http://images.example/a.qcow2",
    "https://[2001:db8::1]:8443/a.qcow2?x=1",
    "HTTP://images.example",
    "http://[::1/x",
    "http://images.example:abc/x",
    "http://user:pw@images.example/x",
    "http://images.example/a b",
    "http://images.example/\x07",
    "http://images.example/é",
    "ftp://images.example/a",
    "file:///etc/passwd",
]
_QUANTITIES = [
    "128Mi",
    " 128Mi\n",
    "128Mi\n",
    "1e100000000",
    "1e30",
    "1e99",
    "1e9",
    "1" * 21,
    "16Ti",
    "17Ti",
    "15Mi",
    "0.5Gi",
    "-1Gi",
    134217728,
    "",
]
_DURATIONS = ["5m", "5m\n", " 5m", "999999999999h", "999999h", "1h30m", "90", "1.5h", "µs"]
_TEXT = ["ok", "ok\n", "a\tb", "\ufffe", "\uffff", "\x7f", "\u2028", "é", "<x/>"]
_NAMES = ["ok", "ok\n", "Ok", "-ok", "ok.example", "a" * 64, "ok\u00a0"]


def corpus() -> Iterator[tuple[str, dict[str, Any]]]:
    for value in _QUANTITIES:
        yield f"memory={value!r}", _set(_VM, ("spec", "memory", "size"), value)
        yield f"disk={value!r}", _set(_VM, ("spec", "disks", 0, "size"), value)
    for value in _DURATIONS:
        yield f"deadline={value!r}", _set(_SNAPSHOT, ("spec", "failureDeadline"), value)
    for value in _TEXT:
        yield f"cmdline={value!r}", _set(_VM, ("spec", "kernel", "cmdline"), f"console={value}")
    for value in _NAMES:
        yield f"vm-name={value!r}", _set(_VM, ("metadata", "name"), value)
        yield f"snapshot-name={value!r}", _set(_SNAPSHOT, ("metadata", "name"), value)
        yield f"image={value!r}", _set(_VM, ("spec", "kernel", "image"), value)
        yield f"disk-name={value!r}", _set(_VM, ("spec", "disks", 0, "name"), value)
        yield f"vm-ref={value!r}", _set(_SNAPSHOT, ("spec", "vmName"), value)
    # Optional booleans in CEL: an absent field must not make a rule error out.
    for memory in (None, True, False):
        for quiesce in (None, True, False):
            spec: dict[str, Any] = {"vmName": "demo"}
            spec |= {} if memory is None else {"includeMemory": memory}
            spec |= {} if quiesce is None else {"quiesce": quiesce}
            yield f"memory={memory},quiesce={quiesce}", {**_SNAPSHOT, "spec": spec}
    for url in _URLS:
        yield f"url={url!r}", _set(_HTTP_VM, ("spec", "disks", 0, "source", "http", "url"), url)
    for mac in [
        "02:00:00:00:00:01",
        "02:00:00:00:00:01\n",
        "03:00:00:00:00:01",
        "02-00-00-00-00-01",
    ]:
        yield f"mac={mac!r}", _set(_VM, ("spec", "interfaces", 0, "macAddress"), mac)


def _offline_refuses(body: dict[str, Any]) -> list[str]:
    doc = manifests.Document(source="corpus", index=0, body=body)
    _, problems = manifests.check_document(doc)
    return [str(p) for p in problems]


def _apiserver_refuses(cluster: Cluster, body: dict[str, Any]) -> str | None:
    result = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--request-timeout=30s",
        "-f",
        "-",
        input=json.dumps(body),
        check=False,
    )
    return result.stderr.strip() if result.returncode != 0 else None


def test_validate_and_the_apiserver_agree(cluster: Cluster, namespace: str) -> None:
    cases = list(corpus())
    for path in INVALID:
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                cases.append((f"{path.name}#{index}", body))
    disagreements = []
    for label, raw in cases:
        body = copy.deepcopy(raw)
        if isinstance(body.get("metadata"), dict):
            body["metadata"]["namespace"] = namespace
        offline = _offline_refuses(body)
        online = _apiserver_refuses(cluster, body)
        if bool(offline) != (online is not None):
            disagreements.append(
                f"{label}: validate {offline or 'accepts'}; apiserver {online or 'accepts'}"
            )
    assert len(cases) > 100
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize("size", ["1e100000000", "1e999999999"])
def test_a_huge_exponent_is_refused_at_once(cluster: Cluster, namespace: str, size: str) -> None:
    """The apiserver used to compute 10^N for this; 30 s is far above a refusal's time."""
    body = _set(_VM, ("spec", "memory", "size"), size)
    body["metadata"]["namespace"] = namespace
    refusal = _apiserver_refuses(cluster, body)
    assert refusal is not None
    assert "spec.memory.size" in refusal
