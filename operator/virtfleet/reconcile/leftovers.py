"""Which of the node's owned domains nobody wants: the orphan sweep's decision.

Pure: the agent lists domains, then the active migrations, then the VMs (in that order,
so a hand-over that completes while it lists is seen as done), and asks this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.failover import failed_over_from


def unwanted_domain(
    vm: Mapping[str, Any] | None,
    uid: str,
    node: str,
    *,
    domain_active: bool,
    migrating: bool,
) -> str | None:
    """Why the domain ``uid`` on ``node`` is a left-over to remove, or None to keep it.

    ``vm`` is the VM named in the domain's ownership element (None if there is none).
    A domain is unwanted when its VM is gone (or is a new VM of the same name), or when
    its VM lives on another node — say both its label and ``status.nodeName`` — no
    migration of it is under way, and the domain is shut off: a copy a crashed libvirtd
    never undefined, which the VM loop of this node would otherwise never look at again.
    A *running* copy elsewhere is never killed from here: only the migration's
    recovery, which looks at both nodes, may decide which copy is the VM.
    """
    if vm is None or str(vm["metadata"].get("uid")) != uid:
        return "its VM is gone"
    if migrating:
        return None  # only the migration's recovery judges a copy during a migration
    moved = failed_over_from(vm, node)
    if moved is not None:
        return f"its VM failed over to {moved}: a stale copy (this node was fenced)"
    elsewhere = _lives_elsewhere(vm, node)
    if elsewhere is None or migrating or domain_active:
        return None
    return f"its VM lives on {elsewhere}"


def unwanted_volume(
    vm: Mapping[str, Any] | None,
    node: str,
    *,
    shared_pool: bool,
    migrating: bool,
    domain_here: bool,
    quarantine_pending: bool = False,
) -> str | None:
    """Why a VM's volume on ``node`` is a left-over to delete, or None to keep it.

    Node-local volumes of a VM that lives elsewhere are what a hand-over had no time to
    delete (it reports success first: the guest already runs on the target). Kept while
    a migration of the VM is under way (a target's volumes are made before the guest
    arrives) or while a domain of the VM is still here; shared-pool volumes are the
    VM's disks wherever it runs.
    """
    if vm is None:
        return "its VM is gone"
    if shared_pool or migrating or domain_here or quarantine_pending:
        return None  # a failover from here not quarantined yet: agent.quarantine keeps it
    elsewhere = _lives_elsewhere(vm, node)
    return None if elsewhere is None else f"its VM lives on {elsewhere}"


def _lives_elsewhere(vm: Mapping[str, Any], node: str) -> str | None:
    """The other node a VM lives on — by its label *and* ``status.nodeName`` — or None."""
    label = (vm["metadata"].get("labels") or {}).get(NODE_LABEL)
    placed = (vm.get("status") or {}).get("nodeName")
    if not label or not placed or node in (label, placed):
        return None
    return str(placed)
