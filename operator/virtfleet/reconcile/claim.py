"""Whose VM is it? Only the controller's placement makes a VM a node's business.

The ``virtfleet.io/node`` label routes a VM to a node's agent (its watch is filtered on
it), but a label is metadata: whoever may edit the VM could write it, and a VM taken on
the strength of the label alone would run where the controller found no room (or that
its ``nodeSelector`` excludes), with its memory then counted on that node. The placement
is the controller's ``status.nodeName`` (status: virtfleet's own, docs/security.md), written
*before* the label; so an agent acts on a VM only when both name its node. The migration
hand-over keeps that true: the source writes ``status.nodeName`` = target first, then the
label, so the target never sees a VM labelled for it that is not placed on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from virtfleet.identity import NODE_LABEL

__all__ = ["Claim", "vm_claim"]


class Claim(StrEnum):
    """What a VM is to the agent of one node."""

    #: Labelled for the node and placed on it by the controller: the agent acts.
    MINE = "Mine"
    #: Labelled for the node, but never placed (no ``status.nodeName``): someone else's
    #: label. The agent defines and starts nothing, and holds no finalizer for it.
    UNPLACED = "Unplaced"
    #: Another node's, or on its way there (``status.nodeName`` names another node).
    ELSEWHERE = "Elsewhere"


def vm_claim(body: Mapping[str, Any], node: str) -> Claim:
    """The :class:`Claim` of a VirtualMachine object for the agent of ``node``."""
    labelled = ((body.get("metadata") or {}).get("labels") or {}).get(NODE_LABEL)
    placed = (body.get("status") or {}).get("nodeName")
    if labelled == node and placed == node:
        return Claim.MINE
    if labelled == node and not placed:
        return Claim.UNPLACED
    return Claim.ELSEWHERE
