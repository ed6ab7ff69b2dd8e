"""The orphan sweep's decision: which owned domains on a node nobody wants."""

from __future__ import annotations

from typing import Any

import pytest

from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.leftovers import unwanted_domain, unwanted_volume

UID = "3f1e0c52-5a64-4a4f-9d0e-0123456789ab"


def vm(label: str | None, placed: str | None, uid: str = UID) -> dict[str, Any]:
    labels = {NODE_LABEL: label} if label else {}
    status = {"nodeName": placed} if placed else {}
    return {"metadata": {"uid": uid, "labels": labels}, "status": status}


def test_a_domain_whose_vm_is_gone_or_replaced_is_unwanted() -> None:
    assert unwanted_domain(None, UID, "node-a", domain_active=True, migrating=False)
    newer = vm("node-a", "node-a", uid="another-uid")
    assert unwanted_domain(newer, UID, "node-a", domain_active=True, migrating=False)


@pytest.mark.parametrize(
    ("label", "placed"),
    [
        ("node-a", "node-a"),
        ("node-a", "node-b"),
        ("node-b", "node-a"),
        (None, None),
        ("node-b", None),
    ],
)
def test_a_domain_of_a_vm_placed_here_or_half_handed_over_is_kept(
    label: str | None, placed: str | None
) -> None:
    body = vm(label, placed)
    assert unwanted_domain(body, UID, "node-a", domain_active=False, migrating=False) is None


def test_a_stopped_copy_of_a_vm_that_lives_elsewhere_is_unwanted() -> None:
    """What a libvirtd killed before it confirmed a migration leaves defined."""
    reason = unwanted_domain(
        vm("node-b", "node-b"), UID, "node-a", domain_active=False, migrating=False
    )
    assert reason == "its VM lives on node-b"


def test_a_running_copy_elsewhere_or_a_migrating_vm_is_never_touched_from_here() -> None:
    elsewhere = vm("node-b", "node-b")
    assert unwanted_domain(elsewhere, UID, "node-a", domain_active=True, migrating=False) is None
    assert unwanted_domain(elsewhere, UID, "node-a", domain_active=False, migrating=True) is None


def test_local_volumes_of_a_vm_that_lives_elsewhere_are_left_overs() -> None:
    """What a hand-over that reported success first had no time to delete."""
    elsewhere = vm("node-b", "node-b")

    def verdict(**kwargs: bool) -> str | None:
        flags = {"shared_pool": False, "migrating": False, "domain_here": False, **kwargs}
        return unwanted_volume(elsewhere, "node-a", **flags)

    assert verdict() == "its VM lives on node-b"
    assert verdict(shared_pool=True) is None  # the VM's disk wherever it runs
    assert verdict(migrating=True) is None  # a target's volumes come before the guest
    assert verdict(domain_here=True) is None
    assert unwanted_volume(None, "node-a", shared_pool=True, migrating=False, domain_here=False)
    here = vm("node-a", "node-a")
    assert not unwanted_volume(
        here, "node-a", shared_pool=False, migrating=False, domain_here=False
    )


def test_a_stale_copy_of_a_failed_over_vm_goes_even_running_but_never_mid_migration() -> None:
    moved = vm("node-b", "node-b")
    moved["status"]["failover"] = {"fromNode": "node-a", "toNode": "node-b", "count": 1}
    assert "failed over" in (
        unwanted_domain(moved, UID, "node-a", domain_active=True, migrating=False) or ""
    )
    # Migrating back to the node it once failed over from: the migration judges.
    assert unwanted_domain(moved, UID, "node-a", domain_active=True, migrating=True) is None
    # Its node-local volumes stay until quarantined; later leftovers go as usual.
    kept = unwanted_volume(
        moved, "node-a", shared_pool=False, migrating=False, domain_here=False,
        quarantine_pending=True,
    )  # fmt: skip
    assert kept is None
    assert unwanted_volume(moved, "node-a", shared_pool=False, migrating=False, domain_here=False)
