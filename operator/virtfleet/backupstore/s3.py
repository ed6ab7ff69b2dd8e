"""A VMBackupLocation's bucket through boto3: the layout of backups in it, and the I/O.

Layout under the location's prefix (the bucket alone is enough to restore)::

    <prefix>/backups/<namespace>/<backup>/manifest.json   written last: "complete"
    <prefix>/backups/<namespace>/<backup>/disks/<disk>.qcow2

Calls block (boto3 is synchronous); the agent and controller run them in executors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtfleet.api.backup import VMBackupLocationSpec
from virtfleet.logs import get_logger

__all__ = [
    "TRANSFER_WORKERS",
    "BackupBucket",
    "Credentials",
    "PartDigests",
    "StoreError",
    "backup_prefix",
    "namespace_prefix",
    "part_size_for",
]

_log = get_logger("virtfleet.backupstore")
MANIFEST = "manifest.json"
#: S3 multipart part size (the minimum is 5 MiB), grown for objects over 160 GB.
PART_SIZE = 32 * 2**20
#: S3's limit is 10,000 parts; a margin.
MAX_PARTS = 9_000
#: Parts moved at once, each way (an upload holds each in memory; a download streams).
TRANSFER_WORKERS = 3
#: A download's read size within a part.
_CHUNK = 2**20


class StoreError(Exception):
    """The store refused or could not be reached; ``reason`` is CamelCase for a condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


def namespace_prefix(prefix: str, namespace: str) -> str:
    """Where the backups of one namespace are, under a location's prefix."""
    base = prefix.strip("/")
    return f"{base + '/' if base else ''}backups/{namespace}/"


def backup_prefix(prefix: str, namespace: str, name: str) -> str:
    return f"{namespace_prefix(prefix, namespace)}{name}/"


def _translate(exc: Exception, what: str) -> StoreError:
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404") and "bucket" in what:
            return StoreError("BucketNotFound", f"{what}: the bucket does not exist")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StoreError(
                "AccessDenied", f"{what}: access denied ({code}); check the credentials"
            )
        return StoreError("StoreError", f"{what}: {code or exc}")
    if isinstance(exc, botocore.exceptions.EndpointConnectionError | ConnectionError):
        return StoreError("Unreachable", f"{what}: cannot connect to the endpoint")
    return StoreError("StoreError", f"{what}: {exc}")


#: One session for the process: a session loads the S3 service model (JSON, ~70 ms of
#: CPU) once, and every client made from it reuses it (measured: a session per client
#: made the agent's upload threads wait for the event loop's JSON parsing). Sessions are
#: not thread-safe: clients are made under the lock; clients themselves are. Made at
#: the first client: boto3 costs ~25 MiB, and most agents never back anything up.
_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _s3_client(**kwargs: Any) -> Any:
    global _SESSION
    with _SESSION_LOCK:
        import boto3.session

        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client("s3", **kwargs)


def _not_found(exc: Exception) -> bool:
    import botocore.exceptions

    return isinstance(exc, botocore.exceptions.ClientError) and str(
        exc.response.get("Error", {}).get("Code")
    ) in ("NoSuchKey", "404")


class BackupBucket:
    """One location's bucket and prefix."""

    def __init__(self, spec: VMBackupLocationSpec, creds: Credentials) -> None:
        self.spec = spec
        self.bucket = spec.bucket
        self.prefix = spec.prefix
        self._ca_file: str | None = None
        if spec.ca_bundle:
            handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the client
                "w", suffix=".pem", delete=False
            )
            handle.write(spec.ca_bundle)
            handle.close()
            self._ca_file = handle.name
        import botocore.config

        self.client: Any = _s3_client(
            endpoint_url=spec.endpoint,
            region_name=spec.region,
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            verify=self._ca_file if self._ca_file else True,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                # Integrity is the manifest's sha256 of every part, checked on restore:
                # boto3's default CRC32 of every request on top of it only costs CPU.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self.rate = spec.bandwidth_limit.bytes if spec.bandwidth_limit else None
        self._throttle = _Throttle(self.rate)

    def close(self) -> None:
        self.client.close()
        if self._ca_file:
            Path(self._ca_file).unlink(missing_ok=True)

    # --- location checks ---------------------------------------------------------------

    def check(self) -> int:
        """Reachable and writable: write and delete a probe object. Returns the number of
        complete backups found under the prefix."""
        probe = f"{self.prefix.strip('/') + '/' if self.prefix.strip('/') else ''}"
        probe += f".virtfleet-probe-{uuid.uuid4().hex}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _translate(exc, f"bucket {self.bucket}") from exc
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"virtfleet")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as exc:
            raise _translate(exc, f"writing to bucket {self.bucket}") from exc
        return len(self.list_manifests())

    def list_manifests(self) -> list[str]:
        """Keys of every manifest under the prefix (one per complete backup)."""
        base = self.prefix.strip("/")
        start = f"{base + '/' if base else ''}backups/"
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            for page in pages:
                for item in page.get("Contents", []):
                    if str(item["Key"]).endswith("/" + MANIFEST):
                        keys.append(str(item["Key"]))
        except Exception as exc:
            raise _translate(exc, f"listing bucket {self.bucket}") from exc
        return keys

    # --- objects -----------------------------------------------------------------------

    def put_json(self, key: str, value: Any) -> None:
        body = json.dumps(value, indent=1, sort_keys=True).encode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json"
            )
        except Exception as exc:
            raise _translate(exc, f"writing {key}") from exc

    def get_json(self, key: str) -> Any | None:
        """The object's JSON, or None when there is no such object."""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise _translate(exc, f"reading {key}") from exc
        try:
            return json.loads(got["Body"].read())
        except ValueError as exc:
            raise StoreError("BadManifest", f"{key} is not JSON: {exc}") from exc

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; the manifest first, so a half-deleted
        backup is never mistaken for a complete one."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=prefix + MANIFEST)
            deleted = 1
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                    deleted += len(keys)
        except Exception as exc:
            raise _translate(exc, f"deleting {prefix}") from exc
        return deleted

    # --- transfers in parts --------------------------------------------------------------

    def begin_upload(self, key: str) -> str:
        """A multipart upload of ``key``; its id. Nothing is visible under ``key`` until
        :meth:`finish_upload` (an aborted one leaves nothing)."""
        try:
            return str(self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"])
        except Exception as exc:
            raise _translate(exc, f"uploading {key}") from exc

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        """One part (numbered from 1), within the location's bandwidth limit; its ETag."""
        self._throttle.take(len(data))
        try:
            got = self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        except Exception as exc:
            raise _translate(exc, f"uploading part {number} of {key}") from exc
        return str(got["ETag"])

    def finish_upload(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = [{"PartNumber": n, "ETag": tag} for n, tag in enumerate(etags, start=1)]
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:
            raise _translate(exc, f"completing {key}") from exc

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Best effort: a store that refuses keeps the parts until its own expiry."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            _log.warning("multipart upload not aborted", key=key, error=str(exc))

    def put_bytes(self, key: str, data: bytes | bytearray) -> None:
        self._throttle.take(len(data))
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as exc:
            raise _translate(exc, f"uploading {key}") from exc

    def object_size(self, key: str) -> int | None:
        """The object's length; None when there is no such object."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except Exception as exc:
            if _not_found(exc):
                return None
            raise _translate(exc, f"reading {key}") from exc

    def download_verified(
        self,
        key: str,
        path: Path,
        parts: PartDigests,
        workers: int = TRANSFER_WORKERS,
        stop: threading.Event | None = None,
    ) -> None:
        """Download ``key`` into ``path``, its parts in parallel (each streamed in chunks:
        memory stays small whatever the part size), each checked against the sha256 the
        manifest recorded for it; the first mismatch or error stops the rest and raises
        (``ChecksumMismatch`` for a mismatch). The file is the caller's to discard then.
        ``stop`` set by the caller ends the download early (it then raises StoreError)."""
        size = self.object_size(key)
        if size is None:
            raise StoreError("ObjectMissing", f"{key}: no such object")
        if size != parts.length:
            raise StoreError(
                "ChecksumMismatch", f"{key}: {size} bytes, the manifest says {parts.length}"
            )
        halt = stop or threading.Event()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:

            def one(index: int) -> None:
                offset, length = parts.span(index)
                digest = hashlib.sha256()
                got = 0
                try:
                    body = self.client.get_object(
                        Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
                    )["Body"]
                    while not halt.is_set():
                        chunk = body.read(_CHUNK)
                        if not chunk:
                            break
                        self._throttle.take(len(chunk))
                        digest.update(chunk)
                        os.pwrite(fd, chunk, offset + got)
                        got += len(chunk)
                except Exception as exc:
                    raise _translate(exc, f"reading {key}") from exc
                if halt.is_set():
                    raise StoreError("Cancelled", f"{key}: download stopped")
                if got != length or digest.hexdigest() != parts.sha256[index]:
                    raise StoreError(
                        "ChecksumMismatch",
                        f"{key}: part {index + 1} has sha256 {digest.hexdigest()} "
                        f"({got} bytes), the manifest says {parts.sha256[index]}",
                    )

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-get")
            try:
                for done in as_completed([pool.submit(one, i) for i in range(len(parts.sha256))]):
                    done.result()
            except BaseException:
                halt.set()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class PartDigests:
    """An object as the manifest records it: ``length`` bytes in parts of ``part_size``
    (the last shorter), the sha256 of each part. Parts are hashed, not the whole object,
    so that parts are read, hashed and moved in parallel both ways."""

    length: int
    part_size: int
    sha256: tuple[str, ...]

    def span(self, index: int) -> tuple[int, int]:
        offset = index * self.part_size
        return offset, min(self.part_size, self.length - offset)

    @property
    def summary(self) -> str:
        """One value for status: the sha256 of the parts' digests, in order."""
        return hashlib.sha256("".join(self.sha256).encode()).hexdigest()

    @staticmethod
    def count(length: int, part_size: int) -> int:
        return max(1, -(-length // part_size))


def part_size_for(length: int) -> int:
    """PART_SIZE, grown (in MiB) so that a huge object stays under S3's part limit."""
    need = -(-length // MAX_PARTS)
    return max(PART_SIZE, -(-need // 2**20) * 2**20)


class _Throttle:
    """Keeps the bytes moved by all threads of one bucket under ``rate`` per second."""

    def __init__(
        self,
        rate: int | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0
        self._clock = clock
        self._sleep = sleep

    def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the rate (after those reserved before)."""
        if not self._rate or n <= 0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._free_at)
            self._free_at = start + n / self._rate
            wait = self._free_at - now
        self._sleep(wait)
