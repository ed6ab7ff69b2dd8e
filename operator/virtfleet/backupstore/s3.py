"""A VMBackupLocation's bucket through boto3: the layout of backups in it, and the I/O.

Layout under the location's prefix (the bucket alone is enough to restore)::

    <prefix>/backups/<namespace>/<backup>/manifest.json   written last: "complete"
    <prefix>/backups/<namespace>/<backup>/disks/<disk>.qcow2

Calls block (boto3 is synchronous); the agent and controller run them in executors.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from virtfleet.api.backup import VMBackupLocationSpec
from virtfleet.logs import get_logger

__all__ = [
    "BackupBucket",
    "ChunkPipe",
    "Credentials",
    "StoreError",
    "backup_prefix",
    "namespace_prefix",
]

_log = get_logger("virtfleet.backupstore")
MANIFEST = "manifest.json"
#: S3 multipart part size (the minimum is 5 MiB), grown for objects over 160 GB.
PART_SIZE = 16 * 2**20
#: S3's limit is 10,000 parts; a margin for a stream longer than announced.
MAX_PARTS = 9_000


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
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=spec.endpoint,
            region_name=spec.region,
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            verify=self._ca_file if self._ca_file else True,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self.rate = spec.bandwidth_limit.bytes if spec.bandwidth_limit else None

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
        except botocore.exceptions.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise _translate(exc, f"reading {key}") from exc
        except Exception as exc:
            raise _translate(exc, f"reading {key}") from exc
        return json.loads(got["Body"].read())

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

    def _transfers(self, size_hint: int = 0) -> TransferConfig:
        """boto3's transfer manager: parts in parallel, the location's bandwidth limit, and
        parts large enough for S3's 10,000-part limit (a stream's size is not known to it)."""
        part = max(PART_SIZE, -(-size_hint // MAX_PARTS))
        config = TransferConfig(
            multipart_threshold=PART_SIZE,
            multipart_chunksize=part,
            max_concurrency=4,
            max_bandwidth=self.rate,
        )
        # A stream is read into memory part by part: at most this many parts at once.
        config.max_in_memory_upload_chunks = 6
        return config

    def upload(
        self,
        key: str,
        chunks: Iterator[bytes],
        on_bytes: Callable[[int], None],
        size_hint: int = 0,
    ) -> int:
        """Upload a stream of chunks as one object (multipart above one part, parts in
        parallel; ``size_hint``, the expected length, sizes the parts). A failed multipart
        upload is aborted by the transfer manager: no partial object is left under ``key``."""
        reader = _ChunkReader(chunks)
        try:
            self.client.upload_fileobj(
                reader, self.bucket, key, Config=self._transfers(size_hint), Callback=on_bytes
            )
        except StoreError:
            raise
        except Exception as exc:
            raise _translate(exc, f"uploading {key}") from exc
        return reader.total

    def download(self, key: str, path: Path) -> str:
        """Download an object into ``path`` (ranged parts in parallel); returns its sha256."""
        try:
            self.client.download_file(self.bucket, key, str(path), Config=self._transfers())
        except Exception as exc:
            raise _translate(exc, f"downloading {key}") from exc
        digest = hashlib.sha256()
        with path.open("rb") as data:
            for block in iter(lambda: data.read(4 * 2**20), b""):
                digest.update(block)
        return digest.hexdigest()


class _ChunkReader(io.RawIOBase):
    """A read-only, non-seekable file over an iterator of chunks (what upload_fileobj reads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.total = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self._pending:
                following = next(self._chunks, None)
                if following is None:
                    break
                self._pending = following  # an empty chunk is not the end
                continue
            take = len(self._pending) if size < 0 else min(size - len(out), len(self._pending))
            out += self._pending[:take]
            self._pending = self._pending[take:]
        self.total += len(out)
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ChunkPipe:
    """Hands chunks from the thread that reads a volume to the thread that uploads them.

    Bounded (``depth`` chunks), so neither side holds more than a few chunks in memory.
    A reader that fails says so (``finish(failed=True)``): the uploader then raises
    instead of completing a truncated object.
    """

    def __init__(self, depth: int = 8) -> None:
        self._items: list[bytes] = []
        self._cond = threading.Condition()
        self._depth = depth
        self._closed = False
        self._reader_failed = False
        self._consumer_failed = False

    def put(self, chunk: bytes) -> None:
        with self._cond:
            while len(self._items) >= self._depth and not self._consumer_failed:
                self._cond.wait()
            if self._consumer_failed:
                raise StoreError("UploadFailed", "the upload stopped")
            self._items.append(chunk)
            self._cond.notify_all()

    def finish(self, *, failed: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._reader_failed = failed
            self._cond.notify_all()

    def consumer_failed(self) -> None:
        with self._cond:
            self._consumer_failed = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    if self._reader_failed:
                        raise StoreError("SourceFailed", "reading the disk data failed")
                    return
                chunk = self._items.pop(0)
                self._cond.notify_all()
            yield chunk
