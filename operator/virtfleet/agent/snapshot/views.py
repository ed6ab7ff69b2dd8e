"""VMSnapshot, VMRestore and VM objects as the pure decisions read them (no I/O).

The loops keep raw object bodies in their caches; these turn one body into the
frozen views of :mod:`virtfleet.reconcile.snapshot_types`, so a spec that does not
validate becomes a reason (``invalid``) instead of an exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from virtfleet import manifests
from virtfleet.api.conditions import parse_rfc3339
from virtfleet.api.snapshot import VMRestoreSpec, VMRestoreStatus, VMSnapshotSpec, VMSnapshotStatus
from virtfleet.api.virtualmachine import RunStrategy, VirtualMachineSpec
from virtfleet.identity import NODE_LABEL
from virtfleet.reconcile.snapshot_types import RestoreView, SnapshotRef, SnapshotView, VmRef
from virtfleet.runtime.versions import is_older


def _created(body: Mapping[str, Any]) -> datetime:
    raw = (body.get("metadata") or {}).get("creationTimestamp")
    if not raw:
        return datetime.now(UTC)
    return parse_rfc3339(str(raw))


def _invalid(exc: ValidationError) -> str:
    return "; ".join(
        f"spec.{manifests.field_path(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()
    )


def newer(cached: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """Whether a watch event's ``body`` is not older than what the cache holds."""
    return not is_older(body, cached)


def _owned_by(body: Mapping[str, Any], vm_uid: str) -> bool:
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == vm_uid for ref in refs)


def vm_ref(body: Mapping[str, Any]) -> VmRef:
    meta = body["metadata"]
    try:
        strategy = VirtualMachineSpec.model_validate(body.get("spec") or {}).run_strategy
    except ValidationError:
        strategy = RunStrategy.MANUAL  # an invalid VM is never started by a restore
    return VmRef(
        name=str(meta["name"]),
        uid=str(meta["uid"]),
        run_strategy=strategy,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def snapshot_view(
    body: Mapping[str, Any], vm_uid: str | None, *, node: str, finalizer: str
) -> SnapshotView:
    """``adopted`` means owned by the VM, labelled for ``node`` and holding ``finalizer``."""
    meta = body["metadata"]
    spec: VMSnapshotSpec | None = None
    invalid = None
    try:
        spec = VMSnapshotSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        invalid = _invalid(exc)
    adopted = (
        vm_uid is not None
        and _owned_by(body, vm_uid)
        and (meta.get("labels") or {}).get(NODE_LABEL) == node
        and finalizer in (meta.get("finalizers") or [])
    )
    return SnapshotView(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        uid=str(meta["uid"]),
        generation=int(meta.get("generation", 1)),
        created=_created(body),
        spec=spec,
        status=VMSnapshotStatus.model_validate(body.get("status") or {}),
        deleting=bool(meta.get("deletionTimestamp")),
        adopted=adopted,
        invalid=invalid,
    )


def restore_view(body: Mapping[str, Any], vm_uid: str) -> RestoreView:
    meta = body["metadata"]
    spec: VMRestoreSpec | None = None
    invalid = None
    try:
        spec = VMRestoreSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        invalid = _invalid(exc)
    return RestoreView(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        uid=str(meta["uid"]),
        generation=int(meta.get("generation", 1)),
        created=_created(body),
        spec=spec,
        status=VMRestoreStatus.model_validate(body.get("status") or {}),
        adopted=_owned_by(body, vm_uid),
        invalid=invalid,
    )


def snapshot_ref(body: Mapping[str, Any], name: str) -> SnapshotRef:
    """The VMSnapshot ``name`` (whose object is ``body``) as a restore judges it."""
    status = VMSnapshotStatus.model_validate(body.get("status") or {})
    return SnapshotRef(
        name=name,
        vm_name=str((body.get("spec") or {}).get("vmName", "")),
        vm_uid=status.vm_uid,
        phase=status.phase,
        ready_to_use=bool(status.ready_to_use),
        libvirt_name=status.snapshot_name,
        memory_included=bool(status.memory_included),
        snapshot_xml=status.snapshot_xml,
        deleting=bool(body["metadata"].get("deletionTimestamp")),
    )
