"""The agent's kopf settings cost no bookkeeping writes, and still hold the finalizer.

kopf's default diff-base storage writes ``last-handled-configuration`` on every new
object and after every label or spec change; the agent has no handler that needs a diff,
so its storage stores nothing and every event is "nothing changed" — except a deletion.
"""

from __future__ import annotations

from typing import Any, cast

import kopf
from kopf._cogs.structs import bodies, diffs, patches
from kopf._core.intents import causes

from virtfleet.agent.handlers import NoDiffBase, kopf_settings
from virtfleet.agent.settings import AgentSettings

FINALIZER = "virtfleet.io/agent-node-a"


def vm(**metadata: Any) -> bodies.Body:
    raw: dict[str, Any] = {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "uid": "u1",
            "labels": {"virtfleet.io/node": "node-a"},
            "finalizers": [FINALIZER],
            **metadata,
        },
        "spec": {"memory": {"size": "64Mi"}},
        "status": {"printableStatus": "Running"},
    }
    return bodies.Body(cast(bodies.RawBody, raw))


def reason(body: bodies.Body, event_type: str = "MODIFIED") -> causes.Reason:
    """What kopf's reactor decides for this event with the agent's storages."""
    settings = kopf_settings(AgentSettings(node_name="node-a"))
    storage = settings.persistence.diffbase_storage
    old = storage.fetch(body=body)
    new = storage.build(body=body)
    cause = causes.detect_changing_cause(
        finalizer=settings.persistence.finalizer,
        raw_event=cast(bodies.RawEvent, {"type": event_type, "object": dict(body)}),
        body=body,
        old=old,
        new=new,
        diff=diffs.diff(old, new),
        resource=None,
        indices=None,
        logger=None,
        patch=patches.Patch(),
        memo=None,
    )
    return cause.reason


def test_the_agent_uses_the_storage_that_stores_nothing() -> None:
    settings = kopf_settings(AgentSettings(node_name="node-a"))
    assert isinstance(settings.persistence.diffbase_storage, NoDiffBase)
    assert settings.persistence.finalizer == FINALIZER


def test_storing_writes_nothing_into_the_patch() -> None:
    body = vm()
    patch = patches.Patch()
    storage = NoDiffBase()
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert not patch


def test_a_new_or_changed_object_is_no_change_for_kopf() -> None:
    assert reason(vm()) is causes.Reason.NOOP
    relabelled = vm(labels={"virtfleet.io/node": "node-a", "team": "x"})
    assert reason(relabelled) is causes.Reason.NOOP


def test_a_deletion_still_runs_the_deletion_handler() -> None:
    assert reason(vm(deletionTimestamp="2026-01-01T00:00:00Z")) is causes.Reason.DELETE


def test_old_annotations_of_the_default_storage_are_ignored() -> None:
    stale = vm(
        annotations={
            "agent-node-a.virtfleet.io/last-handled-configuration": '{"spec": {"old": 1}}',
            "agent-node-a.virtfleet.io/kopf-managed": "yes",
        }
    )
    assert reason(stale) is causes.Reason.NOOP
    assert isinstance(NoDiffBase().fetch(body=stale), dict)
    assert kopf.DiffBaseStorage in type(NoDiffBase()).__mro__


def test_the_apiserver_filters_the_agents_vm_watch_by_its_node() -> None:
    settings = kopf_settings(AgentSettings(node_name="node-a"))
    selectors = settings.watching.label_selectors
    assert selectors["virtfleet.io", "virtualmachines"] == "virtfleet.io/node=node-a"
    assert [selector.any_name for selector in selectors] == ["virtualmachines"]
