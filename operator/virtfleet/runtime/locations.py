"""A VMBackupLocation's bucket, opened with the credentials its Secret holds.

Shared by the controller (checks, deletions, restores) and the agents (uploads, the
downloads of a restored disk): the one place that reads a location's Secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from virtfleet.api.backup import LocationPhase, VMBackupLocationSpec
from virtfleet.backupstore.s3 import BackupBucket, Credentials, StoreError
from virtfleet.runtime.kubeapi import KubeApi, KubeError, NotFound

LOCATION_KIND = "VMBackupLocation"


async def credentials(kube: KubeApi, namespace: str, spec: VMBackupLocationSpec) -> Credentials:
    """The key pair from the location's Secret; :class:`StoreError` says what is missing."""
    ref = spec.credentials_secret
    try:
        key_id = await kube.get_secret_key(namespace, ref.name, ref.access_key_id_key)
        secret = await kube.get_secret_key(namespace, ref.name, ref.secret_access_key_key)
    except NotFound as exc:
        raise StoreError(
            "CredentialsNotFound", f"Secret {ref.name} (or its keys) not found: {exc}"
        ) from exc
    except KubeError as exc:
        raise StoreError("CredentialsUnreadable", f"Secret {ref.name}: {exc}") from exc
    return Credentials(key_id.decode().strip(), secret.decode().strip())


async def open_bucket(kube: KubeApi, namespace: str, spec: VMBackupLocationSpec) -> BackupBucket:
    return BackupBucket(spec, await credentials(kube, namespace, spec))


async def location_state(
    kube: KubeApi, namespace: str, name: str
) -> tuple[VMBackupLocationSpec | None, str | None]:
    """The location's spec and, when its last check did not say Available, why (None: it
    is available). Opens nothing: what a loop asks on every pass."""
    try:
        body: Mapping[str, Any] = await kube.get(LOCATION_KIND, namespace, name)
    except NotFound:
        return None, f"VMBackupLocation {name} does not exist"
    spec = VMBackupLocationSpec.model_validate(body.get("spec") or {})
    status = body.get("status") or {}
    if status.get("phase") != LocationPhase.AVAILABLE.value:
        return spec, str(status.get("message") or "its reachability was not checked yet")
    return spec, None


async def open_location(
    kube: KubeApi, namespace: str, name: str, *, require_available: bool = True
) -> tuple[VMBackupLocationSpec | None, BackupBucket | str]:
    """The location's spec and an open bucket; or, instead of the bucket, why not (a
    message). ``require_available``: only when its last check said Available."""
    spec, unavailable = await location_state(kube, namespace, name)
    if spec is None or (require_available and unavailable):
        return spec, str(unavailable)
    try:
        return spec, await open_bucket(kube, namespace, spec)
    except StoreError as exc:
        return spec, exc.message
