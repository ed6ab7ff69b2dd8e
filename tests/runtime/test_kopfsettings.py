"""Per-identity kopf persistence: distinct finalizers and annotation prefixes (DESIGN §6)."""

from __future__ import annotations

import logging

import kopf
import pytest

from virtfleet.runtime.kopfsettings import (
    MAX_PREFIX,
    WatchOnlyDiffBase,
    configure_kopf,
    storage_prefix,
)


def test_each_identity_gets_its_own_finalizer_and_prefixes() -> None:
    a, b = kopf.OperatorSettings(), kopf.OperatorSettings()
    configure_kopf(a, identity="agent-node-a", finalizer="virtfleet.io/agent-node-a")
    configure_kopf(b, identity="agent-node-b", finalizer="virtfleet.io/agent-node-b")
    assert a.persistence.finalizer != b.persistence.finalizer
    pa, pb = a.persistence.progress_storage, b.persistence.progress_storage
    assert isinstance(pa, kopf.AnnotationsProgressStorage)
    assert isinstance(pb, kopf.AnnotationsProgressStorage)
    assert pa.prefix == "agent-node-a.virtfleet.io"
    assert pb.prefix == "agent-node-b.virtfleet.io"
    da = a.persistence.diffbase_storage
    assert isinstance(da, kopf.AnnotationsDiffBaseStorage)
    assert da.prefix == "agent-node-a.virtfleet.io"
    assert a.posting.level == logging.WARNING


def test_no_finalizer_still_gets_a_name_of_its_own() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings, identity="controller", finalizer=None)
    assert settings.persistence.finalizer == "virtfleet.io/controller"


def test_long_identities_are_shortened_stably() -> None:
    long = "agent-" + "n" * 240
    prefix = storage_prefix(long)
    assert len(prefix) <= MAX_PREFIX
    assert prefix == storage_prefix(long)
    assert prefix != storage_prefix(long + "x")
    assert prefix.endswith(".virtfleet.io")


def test_identities_must_be_dns_like() -> None:
    with pytest.raises(ValueError, match="identity"):
        storage_prefix("Agent/A")


def test_a_watch_only_process_skips_the_diff_base() -> None:
    body = kopf.Body({"metadata": {"name": "vm", "labels": {"a": "b"}}, "spec": {"x": 1}})
    settings = kopf.OperatorSettings()
    configure_kopf(settings, identity="controller", finalizer=None, watch_only=True)
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, WatchOnlyDiffBase)
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None
    # Everybody else keeps kopf's: the agents have change handlers (on.delete).
    configure_kopf(settings, identity="agent-a", finalizer="virtfleet.io/agent-a")
    kept = settings.persistence.diffbase_storage
    assert not isinstance(kept, WatchOnlyDiffBase)
    assert kept.build(body=body)["spec"] == {"x": 1}
